"""The serving gateway on a real Ray Serve + vLLM deployment: one app for the whole module (each
vLLM start costs about a minute), the tiny model as the base and two random LoRA adapters on it.

Covers the OpenAI API through the official client (plain and streaming), authentication (401),
role- and tenant-based authorization (403), rate limits (429 + Retry-After), overload (503),
request validation (4xx), /v1/classify against transformers' label scoring, multi-LoRA outputs
against transformers + peft, Prometheus metrics, the hash-chained audit log, and schemathesis over
the endpoint's own OpenAPI schema.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from cluster.contracts import EndpointSettings, ModelArtifact, TextPreprocessing
from cluster.pii import PiiSettings
from cluster.security import new_api_key
from tests.conftest import EAGER, TEST_SERVE_PORT

pytestmark = pytest.mark.integration

LABELS = ["negative", "neutral", "positive"]
SYSTEM_PROMPT = "Classify the sentiment of the customer's message."
ADAPTERS = {"tenant-a-support": 1, "tenant-b-support": 2}  # adapter name -> seed
TEXTS = ["my bag is lost again", "thanks for the quick rebooking!"]
# As a pipeline's export records it: the data job's cleaning and PII rules.
PREPROCESSING = TextPreprocessing(clean=True, pii=PiiSettings(allow_handles=["united"]))


def test_cpu_engines_get_the_hardware_settings_and_engine_env_wins(tmp_path, monkeypatch):
    import serving.app

    (tmp_path / "config.json").write_text("{}")
    allocator = tmp_path / "libtcmalloc_minimal.so.4"
    allocator.write_bytes(b"")
    monkeypatch.setattr(serving.app, "CPU_PRELOAD", (str(allocator), str(tmp_path / "missing" / "libiomp5.so")))

    def env_of(**fields) -> dict:
        config = serving.app.llm_config(EndpointSettings(model_dir=str(tmp_path), **fields))
        return config.runtime_env["env_vars"]

    cpu = env_of(cpu_kv_cache_gib=3)
    assert cpu["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and cpu["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert cpu["LD_PRELOAD"] == str(allocator)  # only libraries that exist are preloaded
    assert "VLLM_CPU_OMP_THREADS_BIND" not in cpu  # vLLM binds per node itself
    mine = env_of(engine_env={"VLLM_CPU_OMP_THREADS_BIND": "2-3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    assert mine["VLLM_CPU_OMP_THREADS_BIND"] == "2-3" and mine["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    gpu = env_of(use_gpu=True, engine_env={"NCCL_DEBUG": "WARN"})
    assert not any(name.startswith("VLLM_CPU") for name in gpu) and "LD_PRELOAD" not in gpu
    assert gpu["NCCL_DEBUG"] == "WARN"


def make_adapter(base_dir: Path, target: Path, seed: int) -> None:
    """A random LoRA adapter with non-zero B, so it really changes the base model's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(target)


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from cluster.endpoints import deploy

    root = tmp_path_factory.mktemp("serving")
    base_dir = root / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    ModelArtifact(name="tiny", base_model=str(tiny_model_dir), labels=LABELS, system_prompt=SYSTEM_PROMPT,
                  preprocessing=PREPROCESSING).write(base_dir)
    adapters_dir = root / "adapters"
    for name, seed in ADAPTERS.items():
        make_adapter(base_dir, adapters_dir / name, seed)

    keys, records = {}, []
    for key_id, roles, tenant in [("admin", ["admin"], "ops"), ("app-a", ["app"], "a"), ("app-b", ["app"], "b"),
                                  ("analyst-a", ["analyst"], "a"), ("burst-a", ["burst"], "a")]:
        keys[key_id], record = new_api_key(key_id, roles, tenant, key_id=key_id)
        records.append(record)
    audit_path = root / "audit.jsonl"
    settings = EndpointSettings.model_validate({
        "model_id": "tiny", "model_dir": str(base_dir), "max_model_len": 256, "port": TEST_SERVE_PORT, "engine_overrides": EAGER,
        "app_name": "serving-test",
        "lora": {"adapters_dir": str(adapters_dir), "max_lora_rank": 8},
        # Small enough that a burst of concurrent requests overflows the gateway's queue.
        "limits": {"max_tokens": 64, "max_prompt_chars": 2000, "max_n": 2, "max_ongoing_requests": 2,
                   "max_queued_requests": 1},
        "security": {
            "open_routes": ["/health"],
            "api_keys": [record.model_dump() for record in records],
            "models": {"tiny": {"tenant": "*", "classification": "internal"},
                       "tiny:tenant-a-support": {"tenant": "a", "classification": "internal"},
                       "tiny:tenant-b-support": {"tenant": "b", "classification": "internal"}},
            "policy": ["g, burst, app"],
            "rate_limits": {"burst": {"requests_per_minute": 2}},
            "audit": {"path": str(audit_path)},
            # Every route is tried with four bad credentials from this one address: all must be 401s
            # (the per-address limit itself is tested in test_gateway_logic).
            "failed_auth": {"max_failures": 100},
        },
    })
    url = deploy("serving.app:build_app", settings)
    yield {"url": url, "keys": keys, "base_dir": base_dir, "adapters_dir": adapters_dir, "audit": audit_path}
    serve.delete("serving-test")


def call(served, method, route, key=None, headers=None, **kwargs):
    headers = {**(headers or {}), **({"authorization": f"Bearer {served['keys'][key]}"} if key else {})}
    return requests.request(method, served["url"] + route, headers=headers, timeout=120, **kwargs)


def chat_body(model="tiny", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4,
            "temperature": 0, **extra}


def client(served, key="admin"):
    import openai

    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key=served["keys"][key], max_retries=0)


def test_openai_client_plain_and_streaming(served):
    openai_client = client(served)
    assert {model.id for model in openai_client.models.list().data} == {"tiny", *(f"tiny:{name}" for name in ADAPTERS)}
    messages = [{"role": "user", "content": "Where is my bag?"}]
    plain = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert plain.usage.completion_tokens >= 1
    streamed = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == plain.choices[0].message.content  # greedy: the same answer either way

    completion = openai_client.completions.create(model="tiny", prompt="The flight was", max_tokens=6, temperature=0)
    pieces = openai_client.completions.create(model="tiny", prompt="The flight was", max_tokens=6, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].text for chunk in pieces if chunk.choices) == completion.choices[0].text


ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat_body()),
          ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
          ("POST", "/v1/classify", {"model": "tiny", "text": "hi"})]


@pytest.mark.parametrize("method, route, body", ROUTES, ids=[route for _, route, _ in ROUTES])
def test_every_route_needs_credentials(served, method, route, body):
    missing = requests.request(method, served["url"] + route, json=body, timeout=60)
    assert missing.status_code == 401 and "missing credentials" in missing.json()["error"]["message"]
    bad_key = served["keys"]["app-a"][:-4] + "xxxx"
    for header in (f"Bearer {bad_key}", "Bearer lf_nobody_secret", "Basic dXNlcjpwYXNz"):
        answer = requests.request(method, served["url"] + route, json=body, headers={"authorization": header}, timeout=60)
        assert answer.status_code == 401, header
    assert call(served, method, route, "admin", json=body).status_code == 200
    assert requests.get(served["url"] + "/health", timeout=60).status_code == 200  # the open route


@pytest.mark.parametrize("key, route, body, status", [
    ("analyst-a", "/v1/chat/completions", chat_body(), 403),  # analysts may only list and classify
    ("analyst-a", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}, 403),
    ("analyst-a", "/v1/classify", {"model": "tiny", "text": "hi"}, 200),
    ("analyst-a", "/v1/classify", {"model": "tiny:tenant-a-support", "text": "hi"}, 200),
    ("app-a", "/v1/chat/completions", chat_body("tiny:tenant-a-support"), 200),
    ("app-a", "/v1/chat/completions", chat_body("tiny:tenant-b-support"), 403),  # tenant isolation
    ("app-a", "/v1/completions", {"model": "tiny:tenant-b-support", "prompt": "hi", "max_tokens": 2}, 403),
    ("app-a", "/v1/classify", {"model": "tiny:tenant-b-support", "text": "hi"}, 403),
    ("analyst-a", "/v1/classify", {"model": "tiny:tenant-b-support", "text": "hi"}, 403),
    ("app-b", "/v1/chat/completions", chat_body("tiny:tenant-b-support"), 200),
    ("app-b", "/v1/chat/completions", chat_body("tiny:tenant-a-support"), 403),
])
def test_roles_and_tenants(served, key, route, body, status):
    answer = call(served, "POST", route, key, json=body)
    assert answer.status_code == status, answer.text
    if status == 403:
        assert "error" in answer.json()


def test_model_listing_shows_only_what_the_caller_may_use(served):
    def listed(key):
        return {model["id"] for model in call(served, "GET", "/v1/models", key).json()["data"]}

    assert listed("app-a") == {"tiny", "tiny:tenant-a-support"}
    assert listed("app-b") == {"tiny", "tiny:tenant-b-support"}
    assert listed("admin") == {"tiny", "tiny:tenant-a-support", "tiny:tenant-b-support"}
    assert call(served, "GET", "/v1/models/tiny:tenant-b-support", "app-a").status_code == 403


def test_rate_limit_answers_429_with_retry_after(served):
    statuses = [call(served, "GET", "/v1/models", "burst-a") for _ in range(3)]
    assert [answer.status_code for answer in statuses] == [200, 200, 429]
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 60
    assert call(served, "GET", "/v1/models", "app-a").status_code == 200  # other keys are unaffected


def test_overload_answers_503_and_the_replica_keeps_serving(served):
    body = chat_body(max_tokens=64, stream=True)

    def one(_):
        return call(served, "POST", "/v1/chat/completions", "admin", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(8)))
    assert 503 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 503}
    assert call(served, "POST", "/v1/chat/completions", "admin", json=chat_body()).status_code == 200


@pytest.mark.parametrize("body, status, named", [
    (chat_body(max_tokens=10_000), 400, "max_tokens"),
    (chat_body(n=5), 400, "n must be"),
    (chat_body(temperature=7), 400, "temperature"),
    # would crash vLLM's CPU LoRA kernels, so the gateway refuses it on a LoRA endpoint
    ({"model": "tiny", "prompt": "hi", "max_tokens": 1, "prompt_logprobs": 1}, 400, "prompt log-probs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 2500}]}, 413, "2500 characters"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 4}, 400, "256"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "no-such-model"),
])
def test_bad_requests_get_4xx_with_a_message(served, body, status, named):
    route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    answer = call(served, "POST", route, "admin", json=body)
    assert answer.status_code == status, answer.text
    assert named in answer.text


def test_malformed_bodies_and_classify_misuse_then_the_replica_still_answers(served):
    malformed = call(served, "POST", "/v1/chat/completions", "admin", data="{not json",
                     headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    both = call(served, "POST", "/v1/classify", "admin", json={"model": "tiny", "text": "a", "texts": ["b"]})
    assert both.status_code == 400 and "exactly one of" in both.json()["error"]["message"]
    too_many = call(served, "POST", "/v1/classify", "admin", json={"model": "tiny", "texts": ["a"] * 65})
    assert too_many.status_code == 400 and "texts must hold" in too_many.json()["error"]["message"]
    assert call(served, "POST", "/v1/chat/completions", "admin", json=chat_body()).status_code == 200
    assert requests.get(served["url"] + "/health", timeout=60).json()["status"] == "ok"


def transformers_label_probabilities(model_dir: Path, adapter_dir: Path | None, texts: list[str]) -> torch.Tensor:
    """The evaluation's own label scoring (jobs.evaluation.scoring.score_labels) on the same folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.prompting import chat_messages
    from jobs.evaluation.scoring import score_labels

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    prompts = [tokenizer(tokenizer.apply_chat_template(chat_messages(SYSTEM_PROMPT, text), add_generation_prompt=True,
                                                       tokenize=False), add_special_tokens=False).input_ids
               for text in texts]
    labels = [tokenizer(label, add_special_tokens=False).input_ids for label in LABELS]
    return torch.softmax(score_labels(model, prompts, labels, tokenizer.eos_token_id), dim=1)


@pytest.mark.parametrize("model_id", ["tiny", "tiny:tenant-a-support"])
def test_classify_matches_the_evaluations_label_scoring(served, model_id):
    answer = call(served, "POST", "/v1/classify", "admin", json={"model": model_id, "texts": TEXTS})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    adapter = served["adapters_dir"] / model_id.split(":")[1] if ":" in model_id else None
    expected = transformers_label_probabilities(served["base_dir"], adapter, TEXTS)
    for row, result in enumerate(results):
        served_probabilities = [result["probabilities"][label] for label in LABELS]
        assert served_probabilities == pytest.approx(expected[row].tolist(), abs=1e-2)
        assert result["label"] == LABELS[int(expected[row].argmax())]
        assert sum(served_probabilities) == pytest.approx(1, abs=1e-6)


def test_classify_sees_incoming_text_as_training_saw_it(served):
    """A text with a phone number and broken encoding gets the label probabilities its cleaned,
    redacted form gets in the evaluation's scoring (the form the data job trains and evaluates on)."""
    from cluster.text import Preprocessor

    raw = "@united call me at (415) 555-0132 &amp; my bag isnâ€™t  here"
    trained_form = Preprocessor(PREPROCESSING)(raw)
    assert trained_form == "@united call me at <PHONE> & my bag isn't here"
    answers = [call(served, "POST", "/v1/classify", "admin", json={"model": "tiny", "text": text})
               for text in (raw, trained_form)]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    from_raw, from_trained_form = (answer.json()["results"][0]["probabilities"] for answer in answers)
    assert from_raw == from_trained_form
    expected = transformers_label_probabilities(served["base_dir"], None, [trained_form])[0]
    assert [from_raw[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-2)
    unprocessed = transformers_label_probabilities(served["base_dir"], None, [raw])[0]
    assert not torch.allclose(expected, unprocessed, atol=1e-4)  # the preprocessing changes what the model sees


def test_a_chat_with_only_the_text_is_prompted_as_training_was(served):
    """The model folder's system prompt is applied when the client sends none, and the user's text
    is preprocessed: a bare text gets the answer of the trained prompt (the first token and its
    log-probability); a client's own system prompt is kept."""
    from cluster.text import Preprocessor

    raw = "@united my bag isnâ€™t here, call (415) 555-0132"

    def first_token(messages: list[dict]) -> dict:
        answer = call(served, "POST", "/v1/chat/completions", "admin", json={
            "model": "tiny", "messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True})
        assert answer.status_code == 200, answer.text
        token = answer.json()["choices"][0]["logprobs"]["content"][0]
        return {"token": token["token"], "logprob": token["logprob"]}

    trained = first_token([{"role": "system", "content": SYSTEM_PROMPT},
                           {"role": "user", "content": Preprocessor(PREPROCESSING)(raw)}])
    bare = first_token([{"role": "user", "content": raw}])
    assert bare["token"] == trained["token"] and bare["logprob"] == pytest.approx(trained["logprob"], abs=1e-4)
    own = first_token([{"role": "system", "content": "Reply in French, at length."}, {"role": "user", "content": raw}])
    assert own != trained


def first_token_logprobs(model_dir: Path, adapter_dir: Path | None, prompt: str) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    return torch.log_softmax(logits, dim=-1), tokenizer


def test_each_adapter_serves_its_own_outputs(served):
    prompt = "The flight was delayed again and"
    openai_client = client(served)
    served_logprobs = {}
    for model_id in ["tiny", *(f"tiny:{name}" for name in ADAPTERS)]:
        reply = openai_client.completions.create(model=model_id, prompt=prompt, max_tokens=1, temperature=0, logprobs=5)
        token, logprob = next(iter(reply.choices[0].logprobs.top_logprobs[0].items()))
        adapter = served["adapters_dir"] / model_id.split(":")[1] if ":" in model_id else None
        expected, tokenizer = first_token_logprobs(served["base_dir"], adapter, prompt)
        token_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(token))[0]
        assert float(expected[token_id]) == pytest.approx(logprob, abs=1e-2), model_id
        assert float(expected.max() - expected[token_id]) < 1e-2, model_id  # vLLM's greedy pick is the argmax
        served_logprobs[model_id] = reply.choices[0].logprobs.top_logprobs[0]
    # The adapters change the model: their top log-probabilities differ from the base's and each other's.
    base = served_logprobs["tiny"]
    for name in ADAPTERS:
        assert served_logprobs[f"tiny:{name}"] != base
    assert served_logprobs["tiny:tenant-a-support"] != served_logprobs["tiny:tenant-b-support"]


def scrape(pattern: str) -> float:
    """Sum of the samples matching `pattern` on this node's Ray metrics export (Prometheus text)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(match) for match in re.findall(pattern + r"\S* ([0-9.e+]+)$", text, flags=re.M))


def test_metrics_counters_move(served):
    requests_seen = r'^ray_lakeforge_requests(?:_total)?\{(?=[^}]*key_id="app-b")(?=[^}]*status="200")[^}]*\}'
    tokens_seen = r'^ray_lakeforge_output_tokens(?:_total)?\{(?=[^}]*key_id="app-b")[^}]*\}'
    before_requests, before_tokens = scrape(requests_seen), scrape(tokens_seen)
    for _ in range(3):
        assert call(served, "POST", "/v1/chat/completions", "app-b", json=chat_body(max_tokens=4)).status_code == 200
    deadline = time.monotonic() + 90  # metrics reach the export on Ray's report interval
    while scrape(requests_seen) < before_requests + 3 and time.monotonic() < deadline:
        time.sleep(3)
    assert scrape(requests_seen) >= before_requests + 3
    assert scrape(tokens_seen) > before_tokens
    assert scrape(r'^ray_lakeforge_request_latency_s_count\{(?=[^}]*key_id="app-b")[^}]*\}') >= 3
    assert scrape(r'^ray_lakeforge_errors(?:_total)?\{(?=[^}]*status="401")[^}]*\}') >= 1


def test_audit_log_verifies_and_holds_requests_and_decisions(served):
    from cluster.audit import LocalFileKey, verify

    def completions_by_app_a():
        entries = [json.loads(line) for line in served["audit"].read_text().splitlines()]
        return entries, [e for e in entries if e["event"] == "request" and e["route"] == "/v1/completions"
                         and e["key_id"] == "app-a"]

    logged_before = len(completions_by_app_a()[1])
    assert call(served, "POST", "/v1/chat/completions", "app-a", json=chat_body("tiny:tenant-b-support")).status_code == 403
    assert call(served, "POST", "/v1/completions", "app-a",
                json={"model": "tiny", "prompt": "a secret prompt", "max_tokens": 3}).status_code == 200
    # Audit entries are written in batches off the event loop, and a request's entry once its usage is
    # settled, after the answer: wait for this request's entry.
    deadline = time.monotonic() + 60
    while len(completions_by_app_a()[1]) == logged_before and time.monotonic() < deadline:
        time.sleep(0.5)
    report = verify(served["audit"], LocalFileKey(f"{served['audit']}.key", create=False).key())
    assert report.ok, str(report)
    entries, completions = completions_by_app_a()
    assert len(completions) == logged_before + 1
    denied = [e for e in entries if e["event"] == "decision" and not e["allowed"] and e["model"] == "tiny:tenant-b-support"
              and e["key_id"] == "app-a"]
    assert denied and "tenant 'b'" in denied[-1]["detail"]
    requests_logged = [e for e in entries if e["event"] == "request"]
    # (503s from an overflowing queue are answered by Serve's proxy, before the gateway sees them.)
    assert {401, 403, 429, 200, 400, 413} <= {e["status"] for e in requests_logged}
    completion = completions[-1]
    assert completion["status"] == 200 and completion["model"] == "tiny" and completion["subject"] == "app-a"
    assert completion["prompt_tokens"] > 0 and 1 <= completion["completion_tokens"] <= 3
    assert "a secret prompt" not in served["audit"].read_text()  # audit.log_prompts is off


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(served):
    """schemathesis over the live endpoint's /openapi.json (what schemathesis.toml names: no 5xx, every
    answer as documented, what the schema forbids refused), vLLM answering: generated requests, valid
    and invalid, each with an admin key, a restricted role's key (analysts list models and classify)
    and none. The coverage cases run in-process (test_gateway_logic) and in `make bench`."""
    from bench.api_fuzz import fuzz, load_schema

    credentials = {name: {"authorization": f"Bearer {served['keys'][name]}"} for name in ("admin", "analyst-a")}
    credentials["none"] = {}
    schema = load_schema(served["url"], credentials["admin"])
    report = fuzz(schema, credentials, examples=25, coverage=False, base_url=served["url"], derandomize=True)
    assert report["failures"] == [] and report["server_errors"] == 0, json.dumps(report, indent=1)[:20_000]
    assert call(served, "POST", "/v1/chat/completions", "admin", json=chat_body()).status_code == 200  # still serving


def test_health_fails_when_the_engine_dies(served):
    """Last: kills this module's own vLLM engine process (the replica's child), which Serve then replaces."""
    import os

    import psutil

    assert requests.get(served["url"] + "/health", timeout=60).status_code == 200
    # Only processes of this test session's own cluster (descendants of this process) are searched.
    mine = psutil.Process(os.getpid()).children(recursive=True)

    def named(process, text):
        try:
            return text in process.name() or text in " ".join(process.cmdline())
        except psutil.Error:
            return False

    replicas = [process for process in mine if named(process, "ServeReplica:serving-test:LLMServer")]
    assert len(replicas) == 1, replicas
    engines = [child for child in replicas[0].children(recursive=True) if named(child, "EngineCore")]
    assert engines, "no vLLM engine process under the replica"
    for engine in engines:
        engine.kill()
    deadline = time.monotonic() + 60
    while requests.get(served["url"] + "/health", timeout=60).status_code == 200 and time.monotonic() < deadline:
        time.sleep(1)
    answer = requests.get(served["url"] + "/health", timeout=60)
    assert answer.status_code == 503 and "unhealthy" in answer.json()["error"]["message"]
