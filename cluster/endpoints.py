"""Deploying Serve apps by import path, as a Serve config's `import_path` does.

Jobs deploy the serving app this way, by name, so `jobs` never imports `serving`.
"""

from __future__ import annotations

import time

import requests
from ray import serve
from ray._common.utils import import_attr

from cluster.config import ConfigError
from cluster.contracts import EndpointSettings
from cluster.security import KEY_RECORD_ENV, key_record_from_env, new_api_key


def with_local_key(settings: EndpointSettings) -> tuple[str, EndpointSettings]:
    """An admin API key for the deploying job's own calls, and the settings that accept it.

    The key is always fresh and never leaves this process: only its digest goes into the settings.
    A key the submitter wants accepted too (the demo's, for its calls after the job) arrives as its
    record only, the JSON in $LAKEFORGE_API_KEY_RECORD (`key_record_from_env`), and is added beside.
    """
    extra = key_record_from_env()
    key, record = new_api_key("lakeforge-pipeline", ["admin"], "lakeforge", key_id="pipeline")
    if extra is not None and extra.key_id == record.key_id:
        raise ConfigError(f"{KEY_RECORD_ENV}: key id {extra.key_id!r} is the pipeline's own; give the key another id")
    added = [*([extra] if extra is not None else []), record]
    ids = {item.key_id for item in added}
    others = [existing for existing in settings.security.api_keys if existing.key_id not in ids]
    security = settings.security.model_copy(update={"api_keys": [*others, *added]})
    return key, settings.model_copy(update={"security": security})


def deploy(import_path: str, settings: EndpointSettings, timeout_s: float = 900) -> str:
    """Deploy (or update) the app and wait until its engines are healthy; returns the base URL."""
    builder = import_attr(import_path)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(builder(settings.model_dump()), name=settings.app_name, route_prefix="/", blocking=False)
    # A Serve instance already running on this cluster keeps its own proxy address (serve.start
    # only warns): report where the app is really reachable, not the requested port.
    http = serve.context._get_global_client().http_config
    base_url = f"http://{'127.0.0.1' if http.host == '0.0.0.0' else http.host}:{http.port}"
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(settings.app_name)
        if status is not None and status.status == "RUNNING":
            break
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {settings.app_name} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve app {settings.app_name} not running after {timeout_s:.0f}s")
        time.sleep(2)
    # The gateway's engine health route: open by default, and a 401 (closed by config) still proves it answers.
    health = requests.get(f"{base_url}/health", timeout=30)
    if health.status_code >= 500:
        raise RuntimeError(f"Serve app {settings.app_name} is running but unhealthy: {health.text}")
    return base_url
