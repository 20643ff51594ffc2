"""HTTPS on the Serve endpoint (the endpoint's `tls`: Serve's own TLS options), with a CA and a
certificate for 127.0.0.1 made here: the official openai client talks to it with the CA, a client
without it and plain HTTP are refused, and a deploy cannot silently keep another TLS setting."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
import requests

from cluster.config import ConfigError
from cluster.contracts import EndpointSettings, EndpointTls
from cluster.endpoints import https_options
from cluster.security import new_api_key
from tests.conftest import EAGER, write_test_pki

TLS_PORT = 8243  # ports 8200-8299 are this project's test endpoints'; the plain one is TEST_SERVE_PORT


@pytest.fixture(scope="module")
def https_endpoint(ray_cluster, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from cluster.endpoints import deploy

    pki = write_test_pki(tmp_path_factory.mktemp("pki"))
    key, record = new_api_key("tls-test", ["admin"], "ops", key_id="tls-admin")
    settings = EndpointSettings.model_validate({
        "model_id": "tiny", "model_dir": str(tiny_model_dir), "max_model_len": 256, "engine_overrides": EAGER,
        "app_name": "tls-test", "port": TLS_PORT,
        "tls": {"certfile": str(pki["cert"]), "keyfile": str(pki["key"]), "ca_file": str(pki["ca"])},
        "security": {"open_routes": ["/health"], "api_keys": [record.model_dump()],
                     "audit": {"path": str(tmp_path_factory.mktemp("audit") / "audit.jsonl")}},
    })
    # Serve's proxy options are one per cluster and fixed while Serve runs: this module restarts
    # Serve with TLS on the session's cluster and shuts it down after, so the next deploy starts plain again.
    serve.shutdown()
    url = deploy("serving.app:build_app", settings)
    try:
        yield {"url": url, "key": key, "ca": pki["ca"], "settings": settings}
    finally:
        serve.shutdown()


@pytest.mark.integration
def test_the_openai_client_chats_over_https_with_the_ca(https_endpoint):
    assert https_endpoint["url"] == f"https://127.0.0.1:{TLS_PORT}"
    client = openai.OpenAI(base_url=f"{https_endpoint['url']}/v1", api_key=https_endpoint["key"], max_retries=0,
                           http_client=httpx.Client(verify=str(https_endpoint["ca"])))
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where is my bag?"}],
                                           max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1


@pytest.mark.integration
def test_a_client_without_the_ca_and_plain_http_are_refused(https_endpoint):
    url = https_endpoint["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=https_endpoint["key"], max_retries=0)
    with pytest.raises(openai.APIConnectionError) as refused:
        client.models.list()
    assert "CERTIFICATE_VERIFY_FAILED" in repr(refused.value.__cause__)
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{url}/health", timeout=30)
    # The proxy speaks TLS only: a plain-HTTP request gets no HTTP answer at all.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url.replace("https://", "http://") + "/health", timeout=30)
    assert requests.get(f"{url}/health", timeout=30, verify=str(https_endpoint["ca"])).status_code == 200


@pytest.mark.integration
def test_a_deploy_with_other_tls_settings_is_refused_before_anything_is_served(https_endpoint):
    from ray import serve

    from cluster.endpoints import deploy

    plain = https_endpoint["settings"].model_copy(update={"tls": None, "app_name": "plain-on-tls"})
    with pytest.raises(ConfigError, match=r"tls: Serve already runs on this cluster with HTTPS"):
        deploy("serving.app:build_app", plain)
    assert "plain-on-tls" not in serve.status().applications


@pytest.fixture()
def pki(tmp_path):
    return write_test_pki(tmp_path / "pki")


def tls(pki, **changes) -> EndpointTls:
    return EndpointTls(certfile=str(pki["cert"]), keyfile=str(pki["key"]), ca_file=str(pki["ca"])).model_copy(
        update=changes)


def test_good_files_become_serves_own_https_options(pki):
    assert https_options(tls(pki)) == {"ssl_certfile": str(pki["cert"]), "ssl_keyfile": str(pki["key"])}


def test_a_key_readable_by_group_or_others_is_refused(pki):
    os.chmod(pki["key"], 0o640)
    with pytest.raises(ConfigError, match=r"tls.keyfile: .* readable by group or others \(mode 640\): chmod 600"):
        https_options(tls(pki))


def test_an_encrypted_key_is_refused_without_a_prompt(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki["key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.touch(mode=0o600)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"not-in-any-config")))
    with pytest.raises(ConfigError, match=r"tls.keyfile: .* is encrypted"):
        https_options(tls(pki, keyfile=str(encrypted)))


@pytest.mark.parametrize("field", ["certfile", "keyfile", "ca_file"])
def test_a_missing_file_is_named_by_its_field(pki, tmp_path, field):
    with pytest.raises(ConfigError, match=rf"tls.{field}: .*missing.pem is not a readable file"):
        https_options(tls(pki, **{field: str(tmp_path / "missing.pem")}))


def test_a_key_that_is_not_the_certificates_is_refused(pki, tmp_path):
    other = write_test_pki(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"tls.certfile, tls.keyfile: not a PEM certificate and its private key"):
        https_options(tls(pki, keyfile=str(other["key"])))


@pytest.mark.parametrize("field", ["certfile", "keyfile", "ca_file"])
def test_relative_paths_are_refused_by_field(field):
    paths = {"certfile": "/etc/lakeforge/cert.pem", "keyfile": "/etc/lakeforge/key.pem", field: "certs/x.pem"}
    with pytest.raises(ValueError, match=rf"{field} must be an absolute path"):
        EndpointTls(**paths)
