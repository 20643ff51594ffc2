"""Deploying Serve apps by import path, as a Serve config's `import_path` does.

Jobs deploy the serving app this way, by name, so `jobs` never imports `serving`.
"""

from __future__ import annotations

import time

import requests
from ray import serve
from ray._common.utils import import_attr

from cluster.contracts import EndpointSettings


def deploy(import_path: str, settings: EndpointSettings, timeout_s: float = 900) -> str:
    """Deploy (or update) the app and wait until `/v1/models` answers; returns the base URL."""
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
    requests.get(f"{base_url}/v1/models", timeout=30).raise_for_status()
    return base_url
