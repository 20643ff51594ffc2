"""Deploying Serve apps by import path, as a Serve config's `import_path` does.

Jobs deploy the serving app this way, by name, so `jobs` never imports `serving`.
"""

from __future__ import annotations

import os
import ssl
import stat
import time
from pathlib import Path

import requests
from ray import serve
from ray._common.utils import import_attr

from cluster.config import ConfigError
from cluster.contracts import EndpointSettings, EndpointTls
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


def https_options(tls: EndpointTls) -> dict:
    """Serve's HTTP options for `tls`, once its files pass the checks a proxy would otherwise fail
    on later, in its own log: readable files, an owner-only unencrypted key, a key that is certfile's."""
    for field in ("certfile", "keyfile", "ca_file"):
        path = getattr(tls, field)
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"tls.{field}: {path} is not a readable file")
    mode = stat.S_IMODE(Path(tls.keyfile).stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"tls.keyfile: {tls.keyfile} is readable by group or others (mode {mode:o}): chmod 600 it; "
                          "whoever reads the key can pose as the endpoint")

    def encrypted_key():
        # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the terminal.
        raise ConfigError(f"tls.keyfile: {tls.keyfile} is encrypted: Serve would keep its password in its "
                          "controller's state; use an unencrypted key readable by its owner only (mode 0600)")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.certfile, tls.keyfile,
                                                                            password=encrypted_key)
    except ssl.SSLError as error:
        raise ConfigError(f"tls.certfile, tls.keyfile: not a PEM certificate and its private key "
                          f"({error.reason or error})") from None
    return {"ssl_certfile": tls.certfile, "ssl_keyfile": tls.keyfile}


def deploy(import_path: str, settings: EndpointSettings, timeout_s: float = 900) -> str:
    """Deploy (or update) the app and wait until its engines are healthy; returns the base URL."""
    builder = import_attr(import_path)
    tls_options = https_options(settings.tls) if settings.tls is not None else {}
    serve.start(http_options={"host": settings.host, "port": settings.port, **tls_options})
    # A Serve instance already running on this cluster keeps its own proxy options (serve.start
    # only warns): its address is reported below, but a different TLS setting is refused, so an
    # endpoint configured for HTTPS is never served over plain HTTP.
    http = serve.context._get_global_client().http_config
    if http.ssl_certfile != tls_options.get("ssl_certfile"):
        running = f"HTTPS with {http.ssl_certfile}" if http.ssl_certfile else "plain HTTP"
        raise ConfigError(f"tls: Serve already runs on this cluster with {running} on port {http.port}, and its proxy "
                          f"options are fixed while it runs: `serve shutdown` it (every app) to start it with these settings")
    serve.run(builder(settings.model_dump()), name=settings.app_name, route_prefix="/", blocking=False)
    host = settings.tls.hostname if settings.tls is not None and settings.tls.hostname else http.host
    scheme = "https" if settings.tls is not None else "http"
    base_url = f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{http.port}"
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
    health = requests.get(f"{base_url}/health", timeout=30, verify=settings.ca_bundle())
    if health.status_code >= 500:
        raise RuntimeError(f"Serve app {settings.app_name} is running but unhealthy: {health.text}")
    return base_url
