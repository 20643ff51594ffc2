"""Request parameters and limits of the serving gateway (pure logic, no cluster)."""

import pytest

from cluster.contracts import AutoscalingSettings, EndpointSettings, RequestLimits
from cluster.label_scoring import label_probabilities
from serving.limits import InvalidRequest, check_limits, prompt_text, request_params

LIMITS = RequestLimits(max_tokens=64, max_prompt_chars=100, max_n=2)


def test_params_from_chat_and_completion_bodies():
    chat = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_completion_tokens": 7, "n": 2, "temperature": 0.5, "stream": True}
    assert request_params(chat) == {"max_tokens": 7, "n": 2, "temperature": 0.5, "top_p": None, "stream": True,
                                    "prompt_chars": len("be brief\nhello")}
    completion = {"model": "m", "prompt": ["ab", "cd"], "max_tokens": 3}
    assert prompt_text(completion) == "ab\ncd"
    assert request_params(completion)["max_tokens"] == 3 and request_params(completion)["n"] == 1


@pytest.mark.parametrize("change, status, named", [
    ({"max_tokens": 65}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 3}, 400, "n must"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"prompt": "x" * 101}, 413, "101 characters"),
])
def test_limits_name_the_parameter(change, status, named):
    body = {"model": "m", "prompt": "hi", "max_tokens": 8, **change}
    with pytest.raises(InvalidRequest) as error:
        check_limits(request_params(body), LIMITS)
    assert error.value.status == status and named in str(error.value)


def test_requests_within_limits_pass():
    check_limits(request_params({"prompt": "x" * 100, "max_tokens": 64, "n": 2, "temperature": 0, "top_p": 1}), LIMITS)
    check_limits(request_params({"messages": [{"role": "user", "content": "hi"}]}), LIMITS)  # defaults


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
