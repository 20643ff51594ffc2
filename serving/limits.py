"""What a request asks for, and whether the endpoint's limits allow it (pure logic, unit-tested).

The gateway checks these before a request reaches the engine, so an oversized or nonsensical
request costs a 4xx with a message naming the parameter, never engine time or a replica.
"""

from __future__ import annotations

from cluster.contracts import RequestLimits


class InvalidRequest(ValueError):
    """A request the limits refuse; `status` is the HTTP code to answer (400 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def prompt_text(body: dict) -> str:
    """The text a request sends to the model: a completion prompt or the chat messages' contents."""
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # OpenAI content parts: only text parts carry prompt text
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            parts.append(content or "")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "\n".join(item if isinstance(item, str) else " ".join(map(str, item)) for item in prompt)
    return prompt or ""


def request_params(body: dict) -> dict:
    """The parameters policies and limits look at, from a chat or completions body (a dict)."""
    return {
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
        "n": body.get("n") or 1,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "stream": bool(body.get("stream")),
        "prompt_chars": len(prompt_text(body)),
        "prompt_logprobs": body.get("prompt_logprobs") is not None or bool(body.get("echo") and body.get("logprobs") is not None),
    }


def check_limits(params: dict, limits: RequestLimits, prompt_logprobs: bool = True) -> None:
    """Raise InvalidRequest naming the first parameter outside the limits.

    `prompt_logprobs=False` refuses prompt log-probs (`prompt_logprobs`, or `echo` with `logprobs`):
    with LoRA enabled, vLLM 0.32's CPU LoRA logits kernel crashes the engine on them.
    """
    if params["prompt_logprobs"] and not prompt_logprobs:
        raise InvalidRequest(400, "prompt log-probs (prompt_logprobs, or echo with logprobs) are not available "
                                  "on an endpoint serving LoRA adapters")
    max_tokens = params["max_tokens"]
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise InvalidRequest(400, f"max_tokens must be between 1 and {limits.max_tokens} (got {max_tokens})")
    if not 1 <= params["n"] <= limits.max_n:
        raise InvalidRequest(400, f"n must be between 1 and {limits.max_n} (got {params['n']})")
    temperature = params["temperature"]
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidRequest(400, f"temperature must be between 0 and 2 (got {temperature})")
    top_p = params["top_p"]
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequest(400, f"top_p must be in (0, 1] (got {top_p})")
    if params["prompt_chars"] > limits.max_prompt_chars:
        raise InvalidRequest(413, f"prompt is {params['prompt_chars']} characters; the limit is {limits.max_prompt_chars}")
