"""The trained model as one Hugging Face folder servable as is, checked against the trained model's
own logits on a fixed probe input."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

HF_EXPORT_DIR = "hf_model"  # inside each checkpoint: the weights as a transformers folder
PROBE_FILE = "probe_logits.pt"
# A fixed input whose logits are saved beside each export: reloading the export must reproduce them.
PROBE_IDS = torch.arange(1, 33).unsqueeze(0)

# Max |logit difference| between the trained model and its export reloaded in fp32 on the driver's
# CPU. Workers on GPUs use other kernels (and bf16 keeps ~3 digits), so they get looser bounds; a
# broken export (missing, shuffled or untrained weights) is off by whole units either way.
EXPORT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.25}
ADAPTER_DIR = "adapter"  # inside a LoRA run's export: the adapter alone, for multi-LoRA serving


def export_model(trained_dir: Path, base_dir: Path, export_dir: Path) -> None:
    """One Hugging Face folder servable as is. A LoRA checkpoint holds only the adapter: it is
    merged into the base weights, and kept beside them in `adapter/`."""
    shutil.rmtree(export_dir, ignore_errors=True)
    if not (trained_dir / "adapter_config.json").is_file():
        shutil.copytree(trained_dir, export_dir)
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, trained_dir).merge_and_unload()
    merged.save_pretrained(export_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(trained_dir).save_pretrained(export_dir)
    shutil.copytree(trained_dir, export_dir / ADAPTER_DIR)


def verify_export(export_dir: Path, probe_logits: torch.Tensor, tolerance: float) -> float:
    """Reload the export in transformers and compare its probe logits with the trained model's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=PROBE_IDS).logits[0, -1]
    diff = float((logits - probe_logits.float()).abs().max())
    if diff > tolerance:
        raise RuntimeError(f"export {export_dir} does not reproduce the trained model: max |logit diff| {diff:.3g}")
    return diff
