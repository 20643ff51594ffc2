"""The records `jobs` and `serving` meet through: they never import each other.

A fine-tuned model is a Hugging Face folder plus `lakeforge_model.json` (a `ModelArtifact`), so the
serving side knows what the model was trained to do (labels, prompt) without reading job configs.
`EndpointSettings` is the typed argument of the Serve app builder, shared so a pipeline config
validates its serving section at load time, before hours of training.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from cluster.config import StrictModel
from cluster.monitoring import MonitoringSettings
from cluster.pii import PiiSettings
from cluster.security import SecuritySettings

ARTIFACT_FILE = "lakeforge_model.json"


class TextPreprocessing(StrictModel):
    """What every input text went through before templating in training: serving applies the same
    (cluster.text.Preprocessor), so the model sees at serving what it saw in training."""

    clean: bool = Field(default=False, description="Repair encoding, HTML entities, control characters and whitespace (cluster.text.clean_text).")
    pii: PiiSettings | None = Field(
        default=None, description="PII rules applied after cleaning (the run's data.pii); None: none. The hash "
        "salt is recorded as a fingerprint only: serving takes it from $LAKEFORGE_PII_HASH_SALT.")


class ModelArtifact(StrictModel):
    """What a model folder holds and how it expects to be prompted."""

    name: str = Field(description="Model id the model is served under.")
    base_model: str = Field(description="Where the weights started from (a model folder or a named source).")
    task: str = Field(default="classification", description="The task the model was tuned for.")
    labels: list[str] = Field(default_factory=list, description="Label words, in class-index order.")
    system_prompt: str = Field(default="", description="System message used in training; send it when calling the model.")
    max_seq_len: int = Field(default=512, description="Longest training sequence in tokens.")
    preprocessing: TextPreprocessing = Field(
        default_factory=TextPreprocessing, description="Text preprocessing of training, applied to incoming text "
        "by /v1/classify and batch inference (none for folders written before it was recorded).")

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


class LoraSettings(StrictModel):
    """Multi-LoRA: fine-tuned adapters served together on the one base model."""

    adapters_dir: str = Field(
        default="",
        description="Storage folder holding one adapter folder per fine-tuned model (a LoRA run's `adapter/`), "
        "served as `<model_id>:<folder name>` and loaded on first use; a local/shared path or s3:// gs:// URI; empty: LoRA off.",
    )
    max_lora_rank: int = Field(default=16, ge=1, description="Largest adapter rank vLLM reserves room for.")
    max_adapters_per_replica: int = Field(default=4, ge=1, description="Adapters kept loaded per engine replica (least recently used are evicted).")


class RequestLimits(StrictModel):
    """What one request may ask for, and how much traffic a replica accepts before answering 503."""

    max_tokens: int = Field(
        default=512, ge=1,
        description="Largest `max_tokens` (and `min_tokens`) a request may ask for (larger: 400); a request naming none "
        "gets this, or its role's smaller cap (security.param_limits).")
    max_prompt_chars: int = Field(default=32_000, ge=1, description="Longest prompt or chat history in characters (longer: 413).")
    max_n: int = Field(default=4, ge=1, description="Largest `n` or `best_of` (completions generated per prompt).")
    max_prompts: int = Field(
        default=16, ge=1,
        description="Most prompts in one /v1/completions request: a list of prompts is a batch, each generated `n` times.")
    max_logprobs: int = Field(
        default=5, ge=0,
        description="Most log-probs per token a request may ask for: completions `logprobs`, chat `top_logprobs`, "
        "`prompt_logprobs` (-1, the whole vocabulary, is always refused).")
    max_stop: int = Field(default=4, ge=0, description="Most stop sequences (`stop`), and most `stop_token_ids`, in one request.")
    max_stop_chars: int = Field(default=64, ge=1, description="Longest stop sequence in characters.")
    max_classify_texts: int = Field(default=64, ge=1, description="Most texts in one /v1/classify request.")
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests one gateway replica works on at once (Serve max_ongoing_requests).")
    max_queued_requests: int = Field(default=128, ge=0, description="Requests waiting for a replica before new ones get 503 (Serve max_queued_requests).")


class AutoscalingSettings(StrictModel):
    """Engine replicas: a fixed count when min equals max, otherwise Serve autoscaling between them."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest engine replicas (0 lets an idle endpoint scale to zero).")
    max_replicas: int = Field(default=1, ge=1, description="Most engine replicas.")
    target_ongoing_requests: float = Field(default=8, gt=0, description="Ongoing requests per replica the autoscaler aims for.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class EndpointTls(StrictModel):
    """HTTPS on the Serve proxy, with Serve's own TLS options (its uvicorn server terminates TLS).

    Every Serve proxy reads the files itself, so they must be at these paths on each node that runs
    one; `cluster.endpoints.deploy` checks them (readable, the key owner-only and unencrypted, the
    pair matching) before Serve starts. Serve cannot require client certificates (it passes no
    `ssl_cert_reqs` to uvicorn), so callers authenticate with API keys or JWTs, as over HTTP."""

    certfile: str = Field(
        min_length=1, description="Absolute path of the PEM certificate the proxy presents, followed by any intermediate CA "
        "certificates; it must name the address callers use (see hostname).")
    keyfile: str = Field(
        min_length=1, description="Absolute path of certfile's PEM private key, unencrypted and readable by its owner only "
        "(mode 0600 or stricter; anything looser is refused). Not encrypted because Serve would keep a key "
        "password in its controller's state, which its REST API shows.")
    ca_file: str = Field(
        default="",
        description="Absolute path of the CA certificate(s) the project's own callers of the endpoint (the deploy's "
        "health check, the pipeline's serving check) verify certfile with; empty: the system's trusted CAs.")
    hostname: str = Field(
        default="",
        description="Name the project's own callers reach the endpoint by and check its certificate against (e.g. "
        "llm.internal, resolving to a node with a Serve proxy); empty: the endpoint's host (127.0.0.1 when "
        "host is 0.0.0.0), which certfile must then name.")

    @field_validator("certfile", "keyfile", "ca_file")
    @classmethod
    def _absolute(cls, path: str, info) -> str:
        # The files are read in other processes (the proxies, on every node), whose working folder is not the deployer's.
        if path and not Path(path).is_absolute():
            raise ValueError(f"{info.field_name} must be an absolute path (other processes read it), not {path!r}")
        return path


class EndpointSettings(StrictModel):
    """How a model is served by Ray Serve + vLLM (the Serve app builder's argument)."""

    model_id: str = Field(default="lakeforge-model", description="Name clients pass as `model` in OpenAI requests.")
    model_dir: str = Field(default="", description="Hugging Face model folder to serve; filled in by the pipeline after export.")
    max_model_len: int = Field(default=1024, ge=16, description="Longest prompt+completion in tokens; longer prompts get a 400.")
    max_num_seqs: int = Field(
        default=32, ge=1, description="Sequences vLLM batches together per step; requests beyond it wait for a slot "
        "(their time to first token grows), so size it to the concurrent clients the KV cache can hold.")
    dtype: str = Field(default="float32", description="Weight dtype in vLLM: float32 on CPU, bfloat16 on GPUs.")
    use_gpu: bool = Field(default=False, description="Place the engine on a GPU (NVIDIA clusters with the `gpu` extra).")
    cpu_kv_cache_gib: int = Field(default=1, ge=1, description="CPU only: RAM reserved for vLLM's KV cache, in GiB.")
    replica_cpus: float = Field(default=1.0, gt=0, description="Logical CPUs reserved per engine replica.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings, description="Engine replica count or autoscaling range.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Multi-LoRA adapters served on the base model.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Per-request parameter limits and backpressure.")
    security: SecuritySettings = Field(
        default_factory=lambda: SecuritySettings(open_routes=["/-/healthz", "/health"]),
        description="Authentication, authorization, rate limits and audit of every route; the default opens only "
        "the health routes and accepts no key or token, so a deployment must configure its callers.",
    )
    monitoring: MonitoringSettings = Field(
        default_factory=MonitoringSettings,
        description="Prediction log of /v1/classify and the feedback route /v1/feedback (`jobs.monitor` reads both).")
    host: str = Field(default="127.0.0.1", description="Address the Serve HTTP proxy binds; 0.0.0.0 for other machines.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    tls: EndpointTls | None = Field(
        default=None, description="HTTPS on the Serve proxy (certificate and key files); None: plain HTTP. Like host "
        "and port, applied when lakeforge deploys; `serve deploy` takes the Serve config's own `http_options` "
        "(ssl_certfile, ssl_keyfile).")
    app_name: str = Field(default="lakeforge", description="Serve application name.")
    engine_overrides: dict = Field(default_factory=dict, description="Expert escape hatch: extra vLLM engine kwargs, passed through as given.")
    engine_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the engine processes, over the CPU settings chosen for the hardware "
                    "(serving.app.cpu_engine_env: no core reserved for vLLM's scheduler, tcmalloc and Intel OpenMP "
                    "preloaded where installed), e.g. VLLM_CPU_OMP_THREADS_BIND=0-3 for engines sharing a node.")

    def ca_bundle(self) -> str | bool:
        """`verify` for the project's own HTTP clients of this endpoint: tls.ca_file, else the system's CAs."""
        return self.tls.ca_file if self.tls is not None and self.tls.ca_file else True
