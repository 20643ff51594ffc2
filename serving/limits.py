"""What a request asks for, and whether the endpoint's limits allow it (pure logic, unit-tested).

The gateway checks these before a request reaches the engine, so an oversized or nonsensical
request costs a 4xx with a message naming the parameter, never engine time or a replica. Every
parameter that multiplies the engine's work (prompts per request, `n`, `best_of`, log-probs,
stop sequences, `min_tokens`) has a bound in `RequestLimits`.
"""

from __future__ import annotations

import re

from cluster.config import PATH_SEGMENT, PATH_SEGMENT_RULE
from cluster.contracts import RequestLimits

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class InvalidRequest(ValueError):
    """A request the limits refuse; `status` is the HTTP code to answer (400 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _prompts(body: dict) -> list:
    """A completions request's prompts: a string, a list of token ids or None is one prompt; a list
    of strings or of token-id lists is a batch."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(item, (str, list)) for item in prompt):
        return prompt
    return [prompt]


def prompt_text(body: dict) -> str:
    """The text a request sends to the model: a completion prompt or the chat messages' contents."""
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # OpenAI content parts: only text parts carry prompt text
                content = " ".join(part.get("text") or "" for part in content if isinstance(part, dict))
            parts.append(content if isinstance(content, str) else "")
        return "\n".join(parts)
    return "\n".join(item if isinstance(item, str) else " ".join(map(str, item or [])) for item in _prompts(body))


def _logprobs(body: dict) -> dict[str, object]:
    """The log-prob counts a request asks for, by parameter name (chat's `logprobs` is a flag)."""
    names = ("top_logprobs", "prompt_logprobs") if "messages" in body else ("logprobs", "prompt_logprobs")
    return {name: body[name] for name in names if body.get(name) is not None}


def _stop(body: dict) -> list:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


def request_params(body: dict) -> dict:
    """The parameters policies and limits look at, from a chat or completions body (a dict)."""
    chat = "messages" in body
    # Each named token cap is bounded; the engine uses max_completion_tokens when it is set.
    token_caps = {name: body[name] for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None}
    return {
        "max_tokens": next(iter(token_caps.values()), None),
        "token_caps": token_caps,
        "n": 1 if body.get("n") is None else body["n"],
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "stream": bool(body.get("stream")),
        "prompt_chars": len(prompt_text(body)),
        "prompt_logprobs": body.get("prompt_logprobs") is not None or bool(body.get("echo") and body.get("logprobs") is not None),
        "prompts": 1 if chat else len(_prompts(body)),
        "best_of": body.get("best_of"),
        "logprobs": _logprobs(body),
        "min_tokens": body.get("min_tokens") or 0,
        "stop": _stop(body),
        "stop_token_ids": list(body.get("stop_token_ids") or []),
        "roles": [message.get("role") if isinstance(message, dict) else None for message in body.get("messages") or []],
    }


def _within(name: str, value, low: int, high: int) -> None:
    """An integer parameter between `low` and `high`, or InvalidRequest(400) naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(400, f"{name} must be between {low} and {high} (got {value!r})")


def default_max_tokens(limits: RequestLimits, role_cap: int | None, protocol_default: int | None = None) -> int:
    """`max_tokens` for a request that names none: the smallest of the protocol's default (chat has
    none: "the rest of the context"), the endpoint's limit and the caller's role cap, so leaving the
    parameter out never buys more than naming it."""
    return min(value for value in (protocol_default, limits.max_tokens, role_cap) if value is not None)


def check_limits(params: dict, limits: RequestLimits, prompt_logprobs: bool = True) -> None:
    """Raise InvalidRequest naming the first parameter outside the limits.

    `prompt_logprobs=False` refuses prompt log-probs (`prompt_logprobs`, or `echo` with `logprobs`):
    with LoRA enabled, vLLM 0.32's CPU LoRA logits kernel crashes the engine on them.
    """
    for index, role in enumerate(params["roles"]):
        if role not in CHAT_ROLES:
            raise InvalidRequest(400, f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)} (got {role!r})")
    if params["prompt_logprobs"] and not prompt_logprobs:
        raise InvalidRequest(400, "prompt log-probs (prompt_logprobs, or echo with logprobs) are not available "
                                  "on an endpoint serving LoRA adapters")
    for name, value in params["token_caps"].items():
        _within(name, value, 1, limits.max_tokens)
    max_tokens = params["max_tokens"]
    _within("min_tokens", params["min_tokens"], 0, max_tokens or limits.max_tokens)
    _within("n", params["n"], 1, limits.max_n)
    if params["best_of"] is not None:
        _within("best_of", params["best_of"], 1, limits.max_n)
    if params["prompts"] > limits.max_prompts:
        raise InvalidRequest(400, f"prompt holds {params['prompts']} prompts; the limit is {limits.max_prompts}")
    for name, count in params["logprobs"].items():
        _within(name, count, 0, limits.max_logprobs)
    for name in ("stop", "stop_token_ids"):
        if len(params[name]) > limits.max_stop:
            raise InvalidRequest(400, f"{name} holds {len(params[name])} items; the limit is {limits.max_stop}")
    longest = max((len(stop) for stop in params["stop"] if isinstance(stop, str)), default=0)
    if longest > limits.max_stop_chars:
        raise InvalidRequest(400, f"a stop sequence is {longest} characters; the limit is {limits.max_stop_chars}")
    temperature = params["temperature"]
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidRequest(400, f"temperature must be between 0 and 2 (got {temperature})")
    top_p = params["top_p"]
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequest(400, f"top_p must be in (0, 1] (got {top_p})")
    if params["prompt_chars"] > limits.max_prompt_chars:
        raise InvalidRequest(413, f"prompt is {params['prompt_chars']} characters; the limit is {limits.max_prompt_chars}")


def adapter_name(model_id: str) -> str | None:
    """The adapter folder a model id `<base>:<adapter>` names (None for a base model id); an adapter
    name that is not a plain folder name ('..', 'a/b', '') is InvalidRequest(400), so no model id
    reaches a path outside the adapters folder."""
    if ":" not in model_id:
        return None
    name = model_id.split(":", 1)[1]
    if not re.fullmatch(PATH_SEGMENT, name):
        raise InvalidRequest(400, f"model {model_id!r}: the adapter name after ':' must be {PATH_SEGMENT_RULE}")
    return name
