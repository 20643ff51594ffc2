"""The records `jobs` and `serving` meet through: they never import each other.

A fine-tuned model is a Hugging Face folder plus `lakeforge_model.json` (a `ModelArtifact`), so the
serving side knows what the model was trained to do (labels, prompt) without reading job configs.
`EndpointSettings` is the typed argument of the Serve app builder, shared so a pipeline config
validates its serving section at load time, before hours of training.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from cluster.config import StrictModel

ARTIFACT_FILE = "lakeforge_model.json"


class ModelArtifact(StrictModel):
    """What a model folder holds and how it expects to be prompted."""

    name: str = Field(description="Model id the model is served under.")
    base_model: str = Field(description="Where the weights started from (a model folder or a named source).")
    task: str = Field(default="classification", description="The task the model was tuned for.")
    labels: list[str] = Field(default_factory=list, description="Label words, in class-index order.")
    system_prompt: str = Field(default="", description="System message used in training; send it when calling the model.")
    max_seq_len: int = Field(default=512, description="Longest training sequence in tokens.")

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / ARTIFACT_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> "ModelArtifact":
        path = Path(folder) / ARTIFACT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a lakeforge model folder: {ARTIFACT_FILE} is missing")
        return cls.model_validate(json.loads(path.read_text()))


class EndpointSettings(StrictModel):
    """How a model is served by Ray Serve + vLLM (the Serve app builder's argument)."""

    model_id: str = Field(default="lakeforge-model", description="Name clients pass as `model` in OpenAI requests.")
    model_dir: str = Field(default="", description="Hugging Face model folder to serve; filled in by the pipeline after export.")
    max_model_len: int = Field(default=1024, ge=16, description="Longest prompt+completion in tokens; longer prompts get a 400.")
    max_num_seqs: int = Field(default=16, ge=1, description="Sequences vLLM batches together per step.")
    dtype: str = Field(default="float32", description="Weight dtype in vLLM: float32 on CPU, bfloat16 on GPUs.")
    use_gpu: bool = Field(default=False, description="Place the engine on a GPU (NVIDIA clusters with the `gpu` extra).")
    cpu_kv_cache_gib: int = Field(default=1, ge=1, description="CPU only: RAM reserved for vLLM's KV cache, in GiB.")
    replica_cpus: float = Field(default=1.0, gt=0, description="Logical CPUs reserved per engine replica.")
    num_replicas: int = Field(default=1, ge=1, description="Engine replicas (each holds a copy of the model).")
    host: str = Field(default="127.0.0.1", description="Address the Serve HTTP proxy binds; 0.0.0.0 for other machines.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    app_name: str = Field(default="lakeforge", description="Serve application name.")
    engine_overrides: dict = Field(default_factory=dict, description="Expert escape hatch: extra vLLM engine kwargs, passed through as given.")
    engine_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of the engine processes, e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 or LD_PRELOAD of "
                    "tcmalloc and libiomp5 on CPU (bench/serve_bench.py measures which help).")
