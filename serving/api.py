"""The endpoint's HTTP contract: request, answer and error bodies, and the OpenAPI schema at
`/openapi.json` that documents them with this deployment's own limits.

A downstream team generates its client from that schema, so it says what the gateway really does:
- every status a route answers, each error with the one error body (`ErrorBody`); the statuses of
  the guard (401, 429) on every route outside `security.open_routes`, with their headers;
- the bounds `serving.limits.check_limits` enforces, from this deployment's `limits`, as JSON-schema
  keywords on the fields they bound (a request the schema forbids gets a 4xx, and one it allows is
  never refused for a documented bound), and the message roles the gateway accepts.
The chat and completions bodies stay vLLM's request models (through ray.serve.llm), so every
parameter the engine takes is still documented and accepted.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.config import PATH_SEGMENT, PATH_SEGMENT_RULE
from cluster.contracts import EndpointSettings, RequestLimits
from cluster.monitoring import REQUEST_ID_PATTERN
from serving.limits import CHAT_ROLES

JSON_MEDIA = "application/json"
# The model id a request names: a base model, or `<base>:<adapter>` with a plain folder name (400 otherwise).
MODEL_ID_PATTERN = rf"^[^:]*(:{PATH_SEGMENT[1:-1]})?$"


class ErrorDetail(BaseModel):
    """What went wrong."""

    message: str = Field(description="The problem in words, naming the parameter or field (never internal class names); "
                                     "a 500 names only the request id to look for in the gateway's log.")
    type: str = Field(description="`invalid_request_error` for a 4xx, `server_error` for a 5xx.")
    code: int = Field(description="The HTTP status, again.")


class ErrorBody(BaseModel):
    """The body of every error the gateway answers: OpenAI's error shape, which the `openai` client turns
    into its typed exceptions."""

    error: ErrorDetail = Field(description="What went wrong.")


def error_body(status: int, message: str) -> dict:
    """The error body of an answer with this status."""
    return ErrorBody(error=ErrorDetail(message=message, code=status,
                                       type="invalid_request_error" if status < 500 else "server_error")).model_dump()


def problem(errors: list[dict]) -> str:
    """A validation failure in words: where (`body.messages.0.role`) and what, for its first error.

    A location ends before its first part that is no field name or index: pydantic names union
    members and validators there (`ChatCompletionDeveloperMessageParam`, `function-wrap[...]`)."""
    places: dict[str, dict] = {}
    for error in errors:
        parts = []
        for part in error.get("loc") or ():
            if not (isinstance(part, int) or re.fullmatch(r"[a-z_][a-z0-9_]*", part)):
                break
            parts.append(str(part))
        places.setdefault(".".join(parts) or "body", error)
    where, first = next(iter(places.items()))
    cause = first.get("ctx", {}).get("error") if first.get("type") == "value_error" else None
    text = str(cause) if cause is not None else first.get("msg", "invalid value")
    more = f" (and problems in {len(places) - 1} more places)" if len(places) > 1 else ""
    return f"{where}: {text}{more}"


def _fields_typed_first(cls, data, handler):
    """vLLM's own request checks run before pydantic checks the fields' types, and some of them crash
    on a field of the wrong type (`"messages": null` raised a TypeError: a 500). Such a crash becomes a
    400 naming the field whose type is wrong."""
    try:
        return handler(data)
    except (TypeError, AttributeError, KeyError) as crash:
        problems = []
        for name, value in (data.items() if isinstance(data, dict) else ()):
            field = cls.model_fields.get(name)
            try:
                if field is not None:
                    TypeAdapter(field.annotation).validate_python(value)
            except ValidationError as error:
                problems += [{**item, "loc": (name, *item["loc"])} for item in error.errors()]
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems) from None
        raise ValueError(f"the body does not match the request schema ({crash})") from None


class ChatCompletionBody(ChatCompletionRequest):
    """Body of POST /v1/chat/completions: vLLM's chat request (OpenAI's, plus vLLM's sampling
    parameters), within the bounds this schema states."""

    model_config = ConfigDict(strict=True)  # JSON types as the schema says: no "2" or true for an integer
    _typed_first = model_validator(mode="wrap")(classmethod(_fields_typed_first))


class CompletionBody(CompletionRequest):
    """Body of POST /v1/completions: vLLM's completions request (OpenAI's, plus vLLM's sampling
    parameters), within the bounds this schema states."""

    model_config = ConfigDict(strict=True)  # JSON types as the schema says: no "2" or true for an integer
    _typed_first = model_validator(mode="wrap")(classmethod(_fields_typed_first))


class ClassifyRequest(BaseModel):
    """Body of POST /v1/classify: one text or a list of texts for a classification model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = Field(default=None, description="Served model id (base or `<base>:<adapter>`); "
                                                           "the endpoint's base model when left out.")
    text: Optional[str] = Field(default=None, description="One text to classify (give this or `texts`).")
    texts: Optional[list[str]] = Field(default=None, description="Several texts to classify (give this or `text`).")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` or `texts`")
        return self


class LabelScores(BaseModel):
    """One text's label scores."""

    label: str = Field(description="The most probable label.")
    probabilities: dict[str, float] = Field(description="Probability of each label (they sum to 1).")
    logprobs: dict[str, float] = Field(description="Log-probability of each label's tokens after the prompt.")


class ClassifyUsage(BaseModel):
    """Tokens a classification used."""

    prompt_tokens: int = Field(description="Prompt tokens scored, over all texts.")
    completion_tokens: int = Field(description="Always 0: labels are scored, not generated.")


class ClassifyResponse(BaseModel):
    """Answer of POST /v1/classify: label probabilities by label scoring, one result per text."""

    object: Literal["classification"] = Field(description="Always `classification`.")
    id: str = Field(description="The request's id (32 hex digits): send it to POST /v1/feedback with the right "
                                "label once it is known.")
    model: str = Field(description="The model id that scored the texts.")
    results: list[LabelScores] = Field(description="One result per text, in the request's order.")
    usage: ClassifyUsage = Field(description="Tokens used.")


FEEDBACK_LABEL_CHARS = 128


class FeedbackRequest(BaseModel):
    """Body of POST /v1/feedback: the right label of a text /v1/classify scored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = Field(default=None, pattern=MODEL_ID_PATTERN, max_length=256,
                                 description="The model id the text was classified with (its labels are the ones "
                                             "accepted); the endpoint's base model when left out.")
    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="The `id` of the /v1/classify answer.")
    index: int = Field(default=0, ge=0, lt=1024, description="The text's position in that request's `texts` (0 for `text`).")
    label: str = Field(min_length=1, max_length=FEEDBACK_LABEL_CHARS, description="The right label: one of the model's labels.")


class FeedbackResponse(BaseModel):
    """Answer of POST /v1/feedback: the feedback is queued for the feedback log."""

    object: Literal["feedback"] = Field(description="Always `feedback`.")
    request_id: str = Field(description="The request id the label is for.")
    index: int = Field(description="The text's position in that request.")
    label: str = Field(description="The label recorded.")


class HealthResponse(BaseModel):
    """Answer of GET /health when every engine passes its own health check."""

    status: Literal["ok"] = Field(description="Always `ok` (an unhealthy engine gives 503).")
    models: list[str] = Field(description="The base models served.")


STATUS_MEANINGS = {
    400: "The request breaks a documented constraint (a field's type or bound, a message role, an adapter name that "
         "is not a plain folder name, a feedback label that is not one of the model's labels or a request id not in "
         "the form /v1/classify answers), or the engine refused it (a prompt longer than the model's context); the "
         "message names the parameter.",
    401: "No credentials, or credentials that are not valid.",
    403: "Authenticated, but this caller's roles may not call the route, use the model (its tenant or "
         "classification), or ask for that many tokens or completions (the role's caps, `security.param_limits`).",
    404: "No such model: an unknown base model, or an adapter that is not served; or (POST /v1/feedback) this "
         "endpoint does not collect feedback (`monitoring.enabled` is false).",
    408: "The engine did not answer within the gateway's router timeout.",
    413: "The prompt text (all prompts, all messages' text, or all texts to classify, together) is longer than "
         "`limits.max_prompt_chars` characters.",
    415: "The body is not sent as JSON (`Content-Type: application/json`).",
    429: "Too many requests for this key (`security.rate_limits`), or too many failed authentications from this "
         "address (`security.failed_auth`).",
    500: "An unexpected failure; the message names the request id to find in the gateway's log.",
    503: "Not served now: the audit log cannot be written (the gateway fails closed), the endpoint's queue is full "
         "(answered by Serve's proxy, in plain text), or (GET /health) an engine failed its health check.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "required": True,
                               "schema": {"type": "integer", "minimum": 0}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`: send `Authorization: Bearer <api key or token>`.",
                                         "required": True, "schema": {"type": "string"}}}


def answers(*statuses: int) -> dict:
    """FastAPI `responses` for a route's own error statuses: the error body and what each means."""
    return {status: {"model": ErrorBody, "description": STATUS_MEANINGS[status]} for status in statuses}


def generated(model: type, what: str) -> dict:
    """FastAPI `responses` for the 200 of a generating route: the JSON answer, or with `stream: true`
    server-sent events (the schema of each event, as OpenAPI 3.2 words it)."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": f"A chunk of the {what} as JSON (the last chunk carries `usage`), "
                                         "or `[DONE]` after the last one."}}}
    return {200: {"model": model, "description": f"The {what} (JSON), or with `stream: true` its chunks as "
                                                 "server-sent events.",
                  "content": {"text/event-stream": {"schema": event}}}}


def _error_response(status: int) -> dict:
    response = {"description": STATUS_MEANINGS[status],
                "content": {JSON_MEDIA: {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    if status == 503:
        response["content"]["text/plain"] = {"schema": {"type": "string"}}
    return response


def _bounded(schema: dict, bound: dict, rule: str) -> None:
    """Replace a property's type with `bound` (kept nullable where vLLM accepts null) and say the rule."""
    nullable = {"type": "null"} in schema.get("anyOf", [])
    kept = {key: schema[key] for key in ("title", "default", "deprecated") if key in schema}
    description = " ".join(text for text in (schema.get("description"), rule) if text)
    schema.clear()
    if nullable:
        bound = {"anyOf": [*bound.get("anyOf", [bound]), {"type": "null"}]}
    schema.update(kept, **bound)
    if description:
        schema["description"] = description


def _integer(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def _generation_bounds(limits: RequestLimits, completions: bool) -> dict[str, tuple[dict, str]]:
    """The bounds `check_limits` enforces on a chat or completions body, by field: (JSON schema, rule)."""
    stop_text = {"type": "string", "maxLength": limits.max_stop_chars}
    bounds = {
        "model": ({"type": "string", "pattern": MODEL_ID_PATTERN},
                  f"A served model id: the base model, or `<base>:<adapter>` where the adapter is {PATH_SEGMENT_RULE}. "
                  "The endpoint's base model when left out."),
        "max_tokens": (_integer(1, limits.max_tokens), f"At most {limits.max_tokens} (`limits.max_tokens`), and at most "
                       "the caller's role cap (403); left out, the smaller of the two."),
        "min_tokens": (_integer(0, limits.max_tokens), "At most the request's `max_tokens`."),
        "n": (_integer(1, limits.max_n), f"At most {limits.max_n} (`limits.max_n`), and the caller's role cap (403)."),
        "temperature": ({"type": "number", "minimum": 0, "maximum": 2}, "Between 0 and 2."),
        "top_p": ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "Above 0, at most 1."),
        "prompt_logprobs": (_integer(0, limits.max_logprobs),
                            f"At most {limits.max_logprobs} (`limits.max_logprobs`); refused (400) on an endpoint "
                            "serving LoRA adapters."),
        "stop": ({"anyOf": [stop_text, {"type": "array", "items": stop_text, "maxItems": limits.max_stop}]},
                 f"At most {limits.max_stop} sequences of at most {limits.max_stop_chars} characters each."),
        "stop_token_ids": ({"type": "array", "items": {"type": "integer"}, "maxItems": limits.max_stop},
                           f"At most {limits.max_stop} token ids."),
    }
    if completions:
        text = {"type": "string", "maxLength": limits.max_prompt_chars}
        token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
        bounds |= {
            "prompt": ({"anyOf": [text, token_ids, {"type": "array", "items": text, "maxItems": limits.max_prompts},
                                  {"type": "array", "items": token_ids, "maxItems": limits.max_prompts}]},
                       f"One prompt (a text or its token ids) or a batch of at most {limits.max_prompts} "
                       f"(`limits.max_prompts`); all prompts' text together at most {limits.max_prompt_chars} "
                       "characters (413)."),
            "logprobs": (_integer(0, limits.max_logprobs), f"At most {limits.max_logprobs} (`limits.max_logprobs`)."),
            "best_of": (_integer(1, limits.max_n), f"At most {limits.max_n} (`limits.max_n`)."),
        }
    else:
        bounds |= {
            "max_completion_tokens": bounds["max_tokens"],
            "top_logprobs": (_integer(0, limits.max_logprobs), f"At most {limits.max_logprobs} (`limits.max_logprobs`)."),
        }
    return bounds


def describe(schema: dict, settings: EndpointSettings) -> dict:
    """FastAPI's generated schema made honest for this deployment (see the module's doc)."""
    limits, open_routes = settings.limits, settings.security.open_routes
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which the gateway never answers
        models.pop(name, None)
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API key `lf_<key_id>_<secret>` or a JWT from the configured identity provider."}}
    for route, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            statuses = (500, 503) if route in open_routes else (401, 429, 500, 503)
            for status in statuses:
                responses.setdefault(str(status), _error_response(status))
            if route not in open_routes:
                operation["security"] = [{"bearer": []}]
                responses["401"]["headers"] = WWW_AUTHENTICATE
                responses["429"]["headers"] = RETRY_AFTER
    for name, completions in (("ChatCompletionBody", False), ("CompletionBody", True)):
        properties = models[name]["properties"]
        if completions and "best_of" not in properties:  # not a field of vLLM's request: the engine ignores it
            properties["best_of"] = {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Best Of",
                                     "description": "Accepted for OpenAI compatibility; the engine does not use it."}
        for field, (bound, rule) in _generation_bounds(limits, completions).items():
            _bounded(properties[field], bound, rule)
    roles = models["ChatCompletionBody"]["properties"]["messages"]
    # The gateway accepts these roles only (400 otherwise); vLLM's harmony `Message` has none.
    roles["items"]["anyOf"] = [item for item in roles["items"]["anyOf"] if item["$ref"] != "#/components/schemas/Message"]
    models["CustomChatCompletionMessageParam"]["properties"]["role"] = {"type": "string", "enum": list(CHAT_ROLES),
                                                                         "title": "Role"}
    classify = models["ClassifyRequest"]["properties"]
    text = {"type": "string", "maxLength": limits.max_prompt_chars}
    _bounded(classify["model"], {"type": "string", "pattern": MODEL_ID_PATTERN}, "")
    _bounded(classify["text"], text, f"At most {limits.max_prompt_chars} characters (413).")
    _bounded(classify["texts"], {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_classify_texts},
             f"1 to {limits.max_classify_texts} texts (`limits.max_classify_texts`), of at most "
             f"{limits.max_prompt_chars} characters together (413).")
    return schema
