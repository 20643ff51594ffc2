"""Request parameters and limits of the serving gateway (pure logic, no cluster)."""

import pytest

from cluster.contracts import AutoscalingSettings, EndpointSettings, RequestLimits
from cluster.prompting import label_probabilities
from serving.limits import InvalidRequest, adapter_name, check_limits, default_max_tokens, prompt_text, request_params

LIMITS = RequestLimits(max_tokens=64, max_prompt_chars=100, max_n=2, max_prompts=3, max_logprobs=2, max_stop=2,
                       max_stop_chars=5)


def test_params_from_chat_and_completion_bodies():
    chat = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_completion_tokens": 7, "n": 2, "temperature": 0.5, "stream": True}
    assert request_params(chat) == {"max_tokens": 7, "token_caps": {"max_completion_tokens": 7}, "n": 2, "temperature": 0.5, "top_p": None, "stream": True,
                                    "prompt_chars": len("be brief\nhello"), "prompt_logprobs": False, "prompts": 1,
                                    "best_of": None, "logprobs": {}, "min_tokens": 0, "stop": [], "stop_token_ids": [],
                                    "roles": ["system", "user"]}
    completion = {"model": "m", "prompt": ["ab", "cd"], "max_tokens": 3, "logprobs": 2, "stop": "\n"}
    assert prompt_text(completion) == "ab\ncd"
    params = request_params(completion)
    assert (params["max_tokens"], params["n"], params["prompts"], params["logprobs"], params["stop"]) == (3, 1, 2, {"logprobs": 2}, ["\n"])


def test_tokenized_prompts_are_one_prompt_or_a_batch():
    """Token-id prompts are schema-valid: they are counted, not a TypeError (a 500) in prompt_text."""
    for prompt, count, text in [([5, 6, 7], 1, "5 6 7"), ([[5, 6], [7]], 2, "5 6\n7"), (None, 1, "")]:
        params = request_params({"model": "m", "prompt": prompt})
        assert (params["prompts"], params["prompt_chars"]) == (count, len(text))


@pytest.mark.parametrize("change, status, named", [
    ({"max_tokens": 65}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 3}, 400, "n must"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"prompt": "x" * 101}, 413, "101 characters"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, 400, "messages[1].role must be one of"),
    ({"messages": [{"content": "no role"}]}, 400, "messages[0].role"),
    ({"best_of": "50"}, 400, "best_of"),
])
def test_limits_name_the_parameter(change, status, named):
    body = {"model": "m", "prompt": "hi", "max_tokens": 8, **change}
    with pytest.raises(InvalidRequest) as error:
        check_limits(request_params(body), LIMITS)
    assert error.value.status == status and named in str(error.value)


def test_prompt_logprobs_are_refused_only_where_they_are_unsafe():
    for body in ({"prompt": "hi", "prompt_logprobs": 1}, {"prompt": "hi", "echo": True, "logprobs": 2}):
        check_limits(request_params(body), LIMITS)
        with pytest.raises(InvalidRequest, match="prompt log-probs"):
            check_limits(request_params(body), LIMITS, prompt_logprobs=False)
    check_limits(request_params({"prompt": "hi", "echo": True}), LIMITS, prompt_logprobs=False)


@pytest.mark.parametrize("at_limit, beyond, status, named", [
    ({"max_tokens": 64}, {"max_tokens": 65}, 400, "max_tokens"),
    ({"max_tokens": 1}, {"max_tokens": -1}, 400, "max_tokens"),  # 0 is tested above
    ({"max_completion_tokens": 64, "max_tokens": 1}, {"max_completion_tokens": 65}, 400, "max_completion_tokens must"),
    # A cap the engine ignores (max_completion_tokens wins) is still bounded, as the schema says.
    ({"max_completion_tokens": 1, "max_tokens": 64}, {"max_completion_tokens": 1, "max_tokens": 65}, 400, "max_tokens must"),
    ({"max_completion_tokens": 1}, {"max_completion_tokens": 0}, 400, "max_completion_tokens must"),
    ({"n": 2}, {"n": 3}, 400, "n must"),
    ({"n": 1}, {"n": 0}, 400, "n must"),  # 0 is refused, not read as the default (the schema says at least 1)
    ({"temperature": 0}, {"temperature": -0.01}, 400, "temperature"),
    ({"temperature": 2}, {"temperature": 2.01}, 400, "temperature"),
    ({"top_p": 1}, {"top_p": 1.01}, 400, "top_p"),
    ({"top_p": 1e-6}, {"top_p": 0}, 400, "top_p"),  # (0, 1]: open at 0
    ({"prompt": "x" * 100}, {"prompt": "x" * 101}, 413, "101 characters"),
    ({"prompt": ["x" * 49, "y" * 50]}, {"prompt": ["x" * 50, "y" * 50]}, 413, "101 characters"),  # joined by a newline
    ({"messages": [{"role": "system", "content": "s" * 49}, {"role": "user", "content": [{"type": "text", "text": "u" * 50}]}]},
     {"messages": [{"role": "system", "content": "s" * 50}, {"role": "user", "content": [{"type": "text", "text": "u" * 50}]}]},
     413, "101 characters"),
    ({"prompt": ["a", "b", "c"]}, {"prompt": ["a", "b", "c", "d"]}, 400, "prompt holds 4 prompts"),
    ({"prompt": [[1], [2], [3]]}, {"prompt": [[1], [2], [3], [4]]}, 400, "prompt holds 4 prompts"),
    ({"best_of": 2}, {"best_of": 3}, 400, "best_of"),
    ({"logprobs": 2}, {"logprobs": 3}, 400, "logprobs must"),
    ({"logprobs": 0}, {"logprobs": -1}, 400, "logprobs must"),  # -1: the whole vocabulary
    ({"prompt_logprobs": 2}, {"prompt_logprobs": 3}, 400, "prompt_logprobs must"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
     {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3}, 400, "top_logprobs must"),
    ({"stop": ["a", "b"]}, {"stop": ["a", "b", "c"]}, 400, "stop holds 3"),
    ({"stop": "abcde"}, {"stop": "abcdef"}, 400, "stop sequence is 6 characters"),
    ({"stop_token_ids": [1, 2]}, {"stop_token_ids": [1, 2, 3]}, 400, "stop_token_ids holds 3"),
    ({"min_tokens": 8}, {"min_tokens": 9}, 400, "min_tokens must be between 0 and 8"),  # at most the request's max_tokens
    ({"max_tokens": None, "min_tokens": 64}, {"max_tokens": None, "min_tokens": 65}, 400, "min_tokens"),
], ids=["max_tokens-max", "max_tokens-min", "max_completion_tokens-first", "max_tokens-beside-max_completion_tokens",
        "max_completion_tokens-min", "n-max", "n-min", "temperature-min",
        "temperature-max", "top_p-max", "top_p-above-0", "prompt-chars", "prompt-list-chars", "chat-chars",
        "prompts", "token-prompts", "best_of", "logprobs-max", "logprobs-min", "prompt_logprobs", "top_logprobs",
        "stop-count", "stop-chars", "stop_token_ids", "min_tokens", "min_tokens-no-max_tokens"])
def test_requests_within_limits_pass(at_limit, beyond, status, named):
    """Exactly at each limit passes; one step beyond it is refused, naming the parameter."""
    body = {"model": "m", "prompt": "hi", "max_tokens": 8}
    assert check_limits(request_params({**body, **at_limit}), LIMITS) is None
    with pytest.raises(InvalidRequest) as error:
        check_limits(request_params({**body, **beyond}), LIMITS)
    assert error.value.status == status and named in str(error.value)


def test_a_request_at_every_limit_at_once_and_one_with_defaults_pass():
    at_every_limit = {"prompt": "x" * 100, "max_tokens": 64, "n": 2, "temperature": 0, "top_p": 1, "best_of": 2,
                      "logprobs": 2, "prompt_logprobs": 2, "stop": ["abcde", "x"], "stop_token_ids": [1, 2], "min_tokens": 64}
    assert request_params(at_every_limit)["prompt_chars"] == LIMITS.max_prompt_chars
    assert check_limits(request_params(at_every_limit), LIMITS) is None
    assert check_limits(request_params({**at_every_limit, "temperature": 2}), LIMITS) is None
    defaults = request_params({"messages": [{"role": "user", "content": "hi"}]})
    assert defaults["max_tokens"] is None and defaults["n"] == 1  # unset: the engine's defaults, within limits
    assert check_limits(defaults, LIMITS) is None


def test_an_omitted_max_tokens_gets_the_smallest_cap():
    assert default_max_tokens(LIMITS, None) == 64  # chat names no default: the endpoint's limit
    assert default_max_tokens(LIMITS, 32) == 32  # a role's cap is smaller
    assert default_max_tokens(LIMITS, 32, 16) == 16  # completions' protocol default is smaller still
    assert default_max_tokens(LIMITS, 1000) == 64


@pytest.mark.parametrize("model_id", ["m:..", "m:.", "m:", "m:../../etc", "m:a/b", "m:.hidden", "m:a:b", "m:a\n"])
def test_adapter_names_are_plain_folder_names(model_id):
    with pytest.raises(InvalidRequest, match="plain folder name") as error:
        adapter_name(model_id)
    assert error.value.status == 400
    assert adapter_name("m:tenant-a_support.v2") == "tenant-a_support.v2" and adapter_name("m") is None


def test_label_probabilities_are_a_softmax():
    probabilities = label_probabilities([-1.0, -2.0, -3.0])
    assert sum(probabilities) == pytest.approx(1)
    assert probabilities[0] / probabilities[1] == pytest.approx(2.718281828, rel=1e-6)


def test_endpoint_settings_are_locked_down_by_default_and_validated():
    settings = EndpointSettings()
    assert settings.security.api_keys == [] and settings.security.jwt is None
    assert set(settings.security.open_routes) == {"/-/healthz", "/health"}
    with pytest.raises(ValueError, match="must not exceed max_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="extra"):
        EndpointSettings.model_validate({"limits": {"max_tokenz": 3}})


def test_replica_options_fixed_or_autoscaling():
    from serving.app import replica_options

    assert replica_options(AutoscalingSettings(min_replicas=2, max_replicas=2)) == {"num_replicas": 2}
    assert replica_options(AutoscalingSettings(min_replicas=0, max_replicas=3, target_ongoing_requests=4)) == {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4}}


def test_local_lora_loader_reads_adapters_in_place(tmp_path):
    import asyncio

    from serving.app import LocalLoraLoader

    (tmp_path / "support").mkdir()
    (tmp_path / "support" / "adapter_config.json").write_text("{}")
    loader = LocalLoraLoader(str(tmp_path))
    loaded = asyncio.run(loader.load_model_from_config("base:support", None))
    assert loaded.local_path == str(tmp_path / "support") and loaded.model_id == "base:support"
    assert asyncio.run(loader.load_model_from_config("base:support", None)) is loaded  # cached: one id per adapter
    with pytest.raises(ValueError, match="no LoRA adapter 'missing'"):
        asyncio.run(loader.load_model_from_config("base:missing", None))
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    (tmp_path.parent / "outside" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="outside"):  # an adapter id may not reach beside the adapters folder
        asyncio.run(loader.load_model_from_config("base:../outside", None))


def test_the_pipelines_local_key_is_stored_as_a_digest(monkeypatch):
    from cluster.config import ConfigError
    from cluster.endpoints import with_local_key
    from cluster.security import Authenticator, new_api_key

    monkeypatch.delenv("LAKEFORGE_API_KEY_RECORD", raising=False)
    key, settings = with_local_key(EndpointSettings())
    assert key not in settings.model_dump_json()
    assert Authenticator(settings.security).authenticate(f"Bearer {key}").roles == ["admin"]
    # A submitter's key arrives as its record (digest) only and is accepted beside the pipeline's own,
    # which is fresh each time; a plaintext $LAKEFORGE_API_KEY in the job's environment is not used.
    chosen, record = new_api_key("x", ["admin"], "t", key_id="chosen")
    monkeypatch.setenv("LAKEFORGE_API_KEY", chosen)
    monkeypatch.setenv("LAKEFORGE_API_KEY_RECORD", record.model_dump_json())
    again, settings = with_local_key(settings)
    assert again not in (key, chosen) and chosen not in settings.model_dump_json()
    authenticator = Authenticator(settings.security)
    assert authenticator.authenticate(f"Bearer {chosen}").key_id == "chosen"
    assert authenticator.authenticate(f"Bearer {again}").key_id == "pipeline"
    assert [item.key_id for item in settings.security.api_keys] == ["chosen", "pipeline"]  # the old pipeline key replaced
    _, clash = new_api_key("x", ["admin"], "t", key_id="pipeline")
    monkeypatch.setenv("LAKEFORGE_API_KEY_RECORD", clash.model_dump_json())
    with pytest.raises(ConfigError, match="LAKEFORGE_API_KEY_RECORD: key id 'pipeline' is the pipeline's own"):
        with_local_key(settings)
