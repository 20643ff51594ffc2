"""The gateway: ray.serve.llm's OpenAI ingress, extended with what downstream systems need.

`Gateway` subclasses `OpenAiIngress` (the OpenAI layer, streaming, LoRA multiplexing stay
ray.serve.llm's) and adds:
- a middleware that authenticates every route outside `security.open_routes` (401; after
  `security.failed_auth.max_failures` failures from one client address in a window, 429 without an
  audit entry each, one summary entry per address and window), takes a request from the key's
  rate-limit bucket (429 + Retry-After; `cluster.rate_limits`: per replica, or shared in Redis), and
  at the end of each response (after the last streamed chunk) writes the request's audit entry and
  its Prometheus metrics;
- audit writes on a background thread (`cluster.audit.AuditWriter`), batched one fsync per batch:
  a request awaits its entry without blocking the event loop;
- per-route authorization (403, every decision audited) and request limits (400/413) before
  anything reaches the engine; `/v1/models` lists only what the caller may use;
- LLM tokens reserved from the key's token bucket before the engine sees a request (max_tokens x n x
  prompts; 429 when they are not there), settled from the usage the engine reports once the response
  has ended (a stream cut before its usage chunk keeps the whole reservation);
- fail closed on the audit log: a request that cannot be audited is answered 503, the cause logged;
  while the log is down, requests are refused (503) at once, one per second trying it again;
- error answers that name the problem (ray.serve.llm's name internal exception classes), all in one
  error body, and an OpenAPI schema at /openapi.json that documents every status and bound
  (`serving.api`);
- `POST /v1/classify`: label probabilities by label scoring through vLLM's prompt log-probs; with
  `monitoring.enabled`, every prediction is queued for the prediction log (`cluster.monitoring`), written
  by a background thread: a log that cannot be written is counted and logged, never fails the request;
- `POST /v1/feedback`: the right label of a prediction, for the feedback log (`jobs.monitor` joins both);
- `GET /health`: fails (503) when an engine's own health check fails, not only when a process dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Optional

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from ray.llm._internal.common.utils.cloud_utils import is_remote_path
from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ErrorResponse, ModelCard,
    ModelList, OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init
from ray.llm._internal.serve.utils.server_utils import get_response_for_error
from ray.util import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match
from vllm.entrypoints.generate.base.protocol import StreamOptions

from cluster.contracts import ARTIFACT_FILE, EndpointSettings, ModelArtifact
from cluster.monitoring import FEEDBACK, FEEDBACK_SCHEMA, PREDICTION_SCHEMA, PREDICTIONS, ParquetLog, text_stats, utc_now
from cluster.prompting import label_probabilities, label_token_ids, prompt_ids
from cluster.audit import AuditError, AuditLog, AuditWriter
from cluster.rate_limits import MemoryRateLimiter, RateLimit, RateLimitStoreUnavailable, RedisRateLimiter
from cluster.security import AccessController, Authenticator, AuthError, Decision, FailedAuthLimiter, client_address
from cluster.storage import path_inside
from cluster.text import Preprocessor
from serving.api import (
    JSON_MEDIA, ChatCompletionBody, ClassifyRequest, ClassifyResponse, CompletionBody, FeedbackRequest,
    FeedbackResponse, HealthResponse, answers, describe, error_body, generated, problem,
)
from serving.limits import (
    InvalidRequest, adapter_name, check_limits, default_max_tokens, prompt_text, request_params,
)

HEALTH_ROUTE = "/health"
HEALTH_TIMEOUT_S = 10
AUDIT_RETRY_S = 1.0  # while the audit log is down, how often a request tries it again (the others get 503 at once)
SHUTDOWN_FLUSH_S = 30.0  # how long shutdown waits for pending audit entries
AUDIT_DOWN = "the audit log cannot be written, so requests are refused until it can (the gateway log says why)"
RATE_LIMITS_DOWN = "the rate-limit store cannot be reached, so requests are refused until it can (the gateway log says why)"
# Serve writes this logger to the replica's log file.
logger = logging.getLogger("ray.serve")


def error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    """An answer with the error body (`serving.api.ErrorBody`)."""
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def whole_seconds(wait: float) -> int:
    """A wait as the whole seconds a client is told (Retry-After and the message): at least 1."""
    return max(1, math.ceil(wait))


def retry_after(seconds: float) -> dict:
    """The Retry-After header for a wait of `seconds`."""
    return {"Retry-After": str(whole_seconds(seconds))}


# ray.serve.llm words an error "Message: <m> (Request ID: <id>), Internal exception: <module.Class>: <m>,
# original exception: <str>", and an engine's error reaches the gateway already worded so.
_RAY_WORDING = re.compile(r"^Message: (?P<message>.*?)(?: \(Request ID: [^)]*\))?, Internal exception: ", re.S)


def client_message(error: Exception) -> str:
    """What a client is told about an exception: the problem in words, never internal class names."""
    if isinstance(error, OpenAIHTTPException):
        text = error.message
    elif isinstance(error, HTTPException):
        text = str(error.detail)
    elif isinstance(error, ValidationError):
        text = problem(error.errors())
    else:
        text = str(error)
    wording = _RAY_WORDING.match(text)
    return wording.group("message") if wording else text


def error_answer(request: Request, error: Exception) -> JSONResponse:
    """The answer to an exception from a route: ray.serve.llm's status (4xx for client errors) and
    log line (with the traceback), and a message naming the problem; a 500 names only the request."""
    request_id = getattr(request.state, "request_id", None) or request.headers.get("x-request-id")
    if isinstance(error, InvalidRequest):
        status = error.status
    else:
        status = get_response_for_error(error, request_id).error.code
    if status == 500:
        return error_response(500, f"internal server error (request id {request_id})")
    return error_response(status, client_message(error))


async def answer_errors(request: Request, call_next) -> Response:
    """Middleware turning route exceptions into `error_answer`s (in place of ray.serve.llm's)."""
    try:
        return await call_next(request)
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001 - every exception becomes an answer
        return error_answer(request, error)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body its route's model refuses: 400 naming the field; a body not sent as JSON: 415 (ray.serve.llm's
    handler echoed the body back, and crashed with a 500 on one that is not JSON)."""
    media = request.headers.get("content-type", "")
    kind = media.split(";")[0].strip().lower()
    if media and not (kind == JSON_MEDIA or (kind.startswith("application/") and kind.endswith("+json"))):
        return error_response(415, f"send the body as JSON (Content-Type: {JSON_MEDIA}), not {media[:100]!r}")
    return error_response(400, problem(error.errors()))


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's HTTP errors (an unknown route, a wrong method, ray.serve.llm's unknown
    model) in the error body, not FastAPI's `{"detail": ...}`."""
    return error_response(error.status_code, str(error.detail), error.headers)


class GatewayMetrics:
    """Prometheus series on Ray's metrics endpoint, tagged per route, model and key."""

    def __init__(self):
        tags = ("route", "model", "key_id")
        self.requests = metrics.Counter("lakeforge_requests", "Requests answered, by status code.", tag_keys=(*tags, "status"))
        self.errors = metrics.Counter("lakeforge_errors", "Requests answered with a 4xx/5xx status.", tag_keys=(*tags, "status"))
        self.latency = metrics.Histogram("lakeforge_request_latency_s", "Time to the last response byte.",
                                         boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120], tag_keys=tags)
        self.ttft = metrics.Histogram("lakeforge_time_to_first_token_s", "Time to the first streamed token.",
                                      boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=tags)
        self.output_tokens = metrics.Counter("lakeforge_output_tokens", "Completion tokens generated.", tag_keys=tags)
        self.tokens_per_s = metrics.Histogram("lakeforge_output_tokens_per_s", "Completion tokens per second of one request.",
                                              boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000], tag_keys=tags)
        # The prediction and feedback logs (tag `log`: predictions or feedback), and what the model predicts.
        self.logged = metrics.Counter("lakeforge_monitoring_logged", "Records queued for a monitoring log.", tag_keys=("log",))
        self.log_failures = metrics.Counter("lakeforge_monitoring_write_failures",
                                            "Records lost because their monitoring log part could not be written.",
                                            tag_keys=("log",))
        self.log_dropped = metrics.Counter("lakeforge_monitoring_dropped",
                                           "Records dropped because the monitoring log's buffer was full.", tag_keys=("log",))
        self.predictions = metrics.Counter("lakeforge_predictions", "Texts classified, by predicted label.",
                                           tag_keys=("model", "label"))
        self.confidence = metrics.Histogram("lakeforge_prediction_confidence", "Probability of the predicted label.",
                                            boundaries=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99], tag_keys=("model",))

    def observe(self, record: dict) -> None:
        # Tags are never client text: every new value is a new series, and Ray's metrics fail (a 500) on
        # non-ASCII. The route's template, a model that exists, the key id (a JWT subject escaped).
        key_id = (record["key_id"] or "-").encode("ascii", "backslashreplace").decode()
        tags = {"route": record["_metric_route"], "model": record.get("_metric_model") or "-", "key_id": key_id}
        status = str(record["status"])
        self.requests.inc(tags={**tags, "status": status})
        if record["status"] >= 400:
            self.errors.inc(tags={**tags, "status": status})
        self.latency.observe(record["latency_s"], tags=tags)
        if record.get("ttft_s") is not None:
            self.ttft.observe(record["ttft_s"], tags=tags)
        if record["completion_tokens"]:
            self.output_tokens.inc(record["completion_tokens"], tags=tags)
            if record["latency_s"] > 0:
                self.tokens_per_s.observe(record["completion_tokens"] / record["latency_s"], tags=tags)


def _usage(payload: dict, record: dict) -> None:
    usage = payload.get("usage") or {}
    record["_usage_seen"] = record.get("_usage_seen") or bool(usage)
    record["prompt_tokens"] = usage.get("prompt_tokens", record["prompt_tokens"])
    record["completion_tokens"] = usage.get("completion_tokens", record["completion_tokens"])


_replica_gateway: "Gateway | None" = None


def _audit_failed(path: Path, error: Exception) -> None:  # on the audit writer's thread, once per failed batch
    logger.error("audit log %s cannot be written, refusing requests until it can: %s", path, error)


def _audit_recovered(path: Path) -> None:
    logger.warning("audit log %s can be written again; serving requests", path)


def _summary_lost(path: Path, summary: dict, error: BaseException) -> None:
    logger.error("audit log %s: failed-authentication summary not written (%s): %s", path, error, json.dumps(summary))


def _summary_written(path: Path, summary: dict, future) -> None:
    if not future.cancelled() and future.exception() is not None:
        _summary_lost(path, summary, future.exception())


async def guard(request: Request, call_next):
    """Authenticate, rate-limit, then audit and measure the whole response (added last: runs first).

    A failed authentication is counted per client address before anything is written: past the
    address's `failed_auth.max_failures` in its window it is answered 429, unaudited (the window's
    summary entry counts it)."""
    gateway = _replica_gateway
    security = gateway.settings.security
    route = request.url.path
    if route in security.open_routes:
        return await call_next(request)
    client = client_address(request.client.host if request.client else None,
                            request.headers.get("x-forwarded-for"), security.trusted_proxies)
    # The route's template (`/v1/models/{model:path}`), not the path, tags the metrics (see GatewayMetrics.observe).
    template = next((known.path for known in request.app.router.routes
                     if known.matches(request.scope)[0] != Match.NONE), "-")
    record = {"event": "request", "route": route, "method": request.method, "client": client, "subject": None,
              "key_id": None, "tenant": None, "model": None, "status": None, "prompt_tokens": 0,
              "completion_tokens": 0, "_started": time.perf_counter(), "_metric_route": template}
    request.state.record = record
    gateway.audit_summaries(gateway.failed_auth.expired())
    if not gateway.audit_writer.probe_due():  # the log is down and was tried just now: refuse at once
        return await gateway.finish(record, error_response(503, AUDIT_DOWN), audit=False)
    try:
        principal = gateway.authenticator.authenticate(request.headers.get("authorization"))
    except AuthError as error:
        wait, summaries = gateway.failed_auth.fail(client)
        gateway.audit_summaries(summaries)
        if wait is not None:
            return await gateway.finish(record, error_response(
                429, f"too many failed authentications from this address; retry in {whole_seconds(wait)}s",
                retry_after(wait)), audit=False)
        return await gateway.finish(record, error_response(401, str(error), {"WWW-Authenticate": "Bearer"}))
    record.update(subject=principal.subject, key_id=principal.key_id, tenant=principal.tenant,
                  _key=principal.key_id or principal.subject)
    request.state.principal = principal
    record["_limit"] = security.rate_limit_for(principal)
    refusal = await gateway.charge(request, requests=1)
    if refusal is not None:
        return await gateway.finish(record, refusal)
    return await gateway.finish(record, await call_next(request))


class Gateway(OpenAiIngress):
    """OpenAiIngress with lakeforge's security, limits, metrics, classify and health routes."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, settings: dict):
        self.settings = EndpointSettings.model_validate(settings)
        self.adapters_dir = self.settings.lora.adapters_dir.rstrip("/")
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths,
                         _get_lora_model_metadata_func=self._adapter_metadata)
        from transformers import AutoTokenizer

        security = self.settings.security
        self.authenticator = Authenticator(security)
        self.access = AccessController(security)
        store = security.rate_limit_store
        self.limiter = RedisRateLimiter(store) if store.backend == "redis" else MemoryRateLimiter(store.max_keys)
        self.failed_auth = FailedAuthLimiter(security.failed_auth)
        self.audit = AuditLog.from_settings(security.audit)
        # The callbacks name the path, not the gateway: the writer's thread must not keep it alive.
        self.audit_writer = AuditWriter(self.audit, retry_s=AUDIT_RETRY_S, on_error=partial(_audit_failed, self.audit.path),
                                        on_recovery=partial(_audit_recovered, self.audit.path))
        self.metrics = GatewayMetrics()
        self.prediction_log = self.feedback_log = None
        monitoring = self.settings.monitoring
        if monitoring.enabled:
            self.prediction_log, self.feedback_log = (
                ParquetLog(monitoring.root, kind, schema, monitoring,
                           on_failure=lambda rows, error, kind=kind: self.metrics.log_failures.inc(rows, tags={"log": kind}),
                           on_drop=lambda rows, kind=kind: self.metrics.log_dropped.inc(rows, tags={"log": kind}))
                for kind, schema in ((PREDICTIONS, PREDICTION_SCHEMA), (FEEDBACK, FEEDBACK_SCHEMA)))
        # The engine's tokenizer and chat template, so /v1/classify scores the evaluation's tokens.
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.model_dir)
        self.base_artifact = self._read_artifact(Path(self.settings.model_dir))
        # Each model's training preprocessing as a function, by artifact; the base model's is built
        # now, so a model whose PII salt is missing fails at deploy, not on the first request.
        self._preprocessors: dict[str, Preprocessor] = {}
        if self.base_artifact is not None:
            self.preprocessor(self.base_artifact)
        # Serve runs a pickled copy of the FastAPI app, but `guard` is this module's function: a
        # module global is how it finds this replica's gateway (one per replica process).
        global _replica_gateway
        _replica_gateway = self

    # ----- security, audit and metrics helpers -----

    async def write_audit(self, entry: dict) -> None:
        """Append to the audit log on the writer's thread and wait for it without blocking the event
        loop, failing closed: what cannot be audited is not served (503)."""
        try:
            future = self.audit_writer.submit(entry)
        except AuditError as error:  # the writer is stopped (shutting down)
            logger.error("audit log %s cannot be written, refusing requests: %s", self.audit.path, error)
            raise OpenAIHTTPException(503, AUDIT_DOWN, type="ServiceUnavailable") from None
        try:
            await asyncio.wrap_future(future)
        except Exception:  # noqa: BLE001 - the writer logged the cause; any failure means not audited
            raise OpenAIHTTPException(503, AUDIT_DOWN, type="ServiceUnavailable") from None

    def audit_summaries(self, summaries: list[dict]) -> None:
        """Queue failed-authentication summaries; no request waits for them (a failure is logged)."""
        for summary in summaries:
            try:
                self.audit_writer.submit(summary).add_done_callback(partial(_summary_written, self.audit.path, summary))
            except AuditError as error:
                _summary_lost(self.audit.path, summary, error)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every audit entry queued so far is written; False if `timeout` ran out first."""
        return self.audit_writer.flush(timeout)

    def close(self) -> None:
        """Write the open failed-authentication windows' summaries and every pending audit entry, then
        stop the writer, then write the monitoring logs' waiting records; idempotent. Serve calls it (as
        `__del__`) when the replica shuts down."""
        writer = getattr(self, "audit_writer", None)
        if writer is None:  # __init__ did not get that far
            return
        self.audit_summaries(self.failed_auth.drain())
        writer.close(SHUTDOWN_FLUSH_S)
        for log in (getattr(self, "prediction_log", None), getattr(self, "feedback_log", None)):
            if log is not None:  # written by now, or lost and counted: close never raises into shutdown
                log.close()

    def __del__(self):
        self.close()

    async def finish(self, record: dict, response: Response, audit: bool = True) -> Response:
        """Write the audit entry (unless not `audit`) and metrics once the response's last byte is sent."""
        async def close():
            record["status"] = response.status_code
            record["latency_s"] = time.perf_counter() - record["_started"]
            record["outcome"] = "ok" if response.status_code < 400 else "error"
            reserved = record.get("_reserved", 0)
            used = record["prompt_tokens"] + record["completion_tokens"]
            if record.get("_streamed") and not record.get("_usage_seen"):
                used = reserved  # the stream ended before its usage chunk: what it used is unknown
            if "_limit" in record and record["_limit"].tokens_per_minute is not None and used != reserved:
                await asyncio.to_thread(self.limiter.settle, record["_key"], record["_limit"], reserved, used)
            self.metrics.observe(record)
            if audit:
                await self.write_audit(self._audit_entry(record))

        iterator = getattr(response, "body_iterator", None)
        if iterator is None:
            try:
                await close()
            except OpenAIHTTPException as error:  # the audit log is down: not answered, 503
                return error_response(error.status_code, error.message)
            return response

        async def measured():
            try:
                async for chunk in iterator:
                    yield chunk
            finally:
                try:
                    await close()
                except OpenAIHTTPException:
                    pass  # the body is sent already; the writer logged why its entry is missing
        response.body_iterator = measured()
        return response

    def _audit_entry(self, record: dict) -> dict:
        entry = {key: value for key, value in record.items() if not key.startswith("_") and key != "prompt"}
        if self.settings.security.audit.log_prompts and record.get("prompt") is not None:
            entry["prompt"] = record["prompt"]
        return entry

    async def charge(self, request: Request, requests: int = 0, tokens: int = 0) -> Optional[Response]:
        """Take `requests` and `tokens` from the caller's rate-limit buckets: None when taken, else the
        answer: 429 with the bucket's Retry-After, or 503 when the store is down and refuses. Off the
        event loop: a Redis store is a network call."""
        record, roles = request.state.record, ", ".join(request.state.principal.roles)
        if record["_limit"] == RateLimit():  # unlimited: nothing to take, no thread to wait for
            return None
        try:
            wait = await asyncio.to_thread(self.limiter.acquire, record["_key"], record["_limit"], requests, tokens)
        except RateLimitStoreUnavailable as error:
            return error_response(503, RATE_LIMITS_DOWN, retry_after(error.retry_after_s))
        if wait is None:
            return None
        seconds = whole_seconds(wait)
        if tokens:
            return error_response(429, f"token rate limit of role(s) {roles} reached: this request reserves {tokens} tokens "
                                       f"(max_tokens x n x prompts); retry in {seconds}s", retry_after(wait))
        return error_response(429, f"rate limit of role(s) {roles} reached; retry in {seconds}s", retry_after(wait))

    async def audit_decision(self, request: Request, route: str, model_id: Optional[str], decision: Decision) -> None:
        principal = request.state.principal
        await self.write_audit({"event": "decision", "route": route, "client": request.state.record["client"],
                                "model": model_id, "subject": principal.subject, "key_id": principal.key_id,
                                "tenant": principal.tenant, "allowed": decision.allowed, "reason": decision.reason,
                                "detail": decision.detail})

    async def authorize(self, request: Request, route: str, model_id: str, params: dict) -> None:
        """Ask the access controller, audit the decision, and answer 403 when denied."""
        decision = self.access.decide(request.state.principal, route, model_id, params)
        await self.audit_decision(request, route, model_id, decision)
        if not decision.allowed:
            raise OpenAIHTTPException(403, f"access denied: {decision.reason}", type="PermissionDenied")

    async def admit(self, request: Request, requested: Optional[str], params: dict) -> str:
        """The model id a request may use: 404 for an unknown base model, 400 for an adapter name that
        is not a plain folder name, 403 when denied, then 404 for a missing local adapter (after the
        decision, so a caller cannot probe which adapters exist; the engine would answer 500)."""
        record = request.state.record
        model_id = record["model"] = await self._get_model_id(requested)
        record["_metric_model"] = get_base_model_id(model_id)  # an adapter's own name once it is known to exist
        adapter = adapter_name(model_id)
        await self.authorize(request, request.url.path, model_id, params)
        if adapter is not None and self._local_adapters():
            if adapter not in self._adapter_names():
                raise OpenAIHTTPException(404, f"model {model_id!r} does not exist", type="NotFound")
            record["_metric_model"] = model_id
        return model_id

    # ----- OpenAI routes -----

    async def _generate(self, body, request: Request, call_method: str) -> Response:
        record = request.state.record
        raw = body.model_dump()
        params = request_params(raw)
        if params["max_tokens"] is None or not {"max_tokens", "max_completion_tokens"} & body.model_fields_set:
            # Left out (or null): the role's cap applies too, so leaving it out never buys more than naming it.
            cap = self.settings.security.param_limits_for(request.state.principal).max_tokens
            body.max_tokens = params["max_tokens"] = default_max_tokens(self.settings.limits, cap, body.max_tokens)
        model_id = await self.admit(request, body.model, params)
        check_limits(params, self.settings.limits, prompt_logprobs=not self.adapters_dir)
        if record["_limit"].tokens_per_minute is not None:
            # The most the engine can generate for it, held until its usage is known (settled in `finish`).
            reserve = params["max_tokens"] * params["n"] * params["prompts"]
            refusal = await self.charge(request, tokens=reserve)
            if refusal is not None:
                return refusal
            record["_reserved"] = reserve
        if call_method == "chat":
            self._prompt_as_trained(body, model_id)
        if self.settings.security.audit.log_prompts:
            record["prompt"] = prompt_text(raw)
        if body.stream:  # the final chunk then carries usage, for the audit, limits and metrics
            body.stream_options = StreamOptions(include_usage=True)
        # The engine replica gets ray.serve.llm's own request class: it never needs serving.api.
        engine_class = ChatCompletionRequest if call_method == "chat" else CompletionRequest
        body = engine_class.model_construct(body.model_fields_set, **dict(body))
        response = await self._process_llm_request(body, call_method=call_method, raw_request=request)
        if isinstance(response, StreamingResponse):
            record["_streamed"] = True
            response.body_iterator = self._watch_stream(response.body_iterator, record)
        else:
            _usage(json.loads(response.body), record)
        return response

    def _prompt_as_trained(self, body: ChatCompletionBody, model_id: str) -> None:
        """A chat with a classification model is prompted as its training examples were: the model
        folder's system prompt when the client sends none (a bare text got nonsense before), and
        each user turn preprocessed (cleaning, PII rules) as the training text was."""
        artifact = self._artifact_or_none(model_id)
        if artifact is None or not artifact.labels:
            return
        preprocess = self.preprocessor(artifact)
        messages = [dict(message) for message in body.messages]
        for message in messages:
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                message["content"] = preprocess(message["content"])
        if artifact.system_prompt and not any(message.get("role") == "system" for message in messages):
            messages.insert(0, {"role": "system", "content": artifact.system_prompt})
        body.messages = messages

    @staticmethod
    async def _watch_stream(chunks, record: dict):
        """Pass SSE chunks through, noting time to first token and the final usage chunk."""
        async for chunk in chunks:
            text = chunk if isinstance(chunk, str) else chunk.decode()
            for line in text.splitlines():
                if not line.startswith("data: {"):
                    continue
                payload = json.loads(line[len("data: "):])
                if record.get("ttft_s") is None and payload.get("choices"):
                    record["ttft_s"] = time.perf_counter() - record["_started"]
                _usage(payload, record)
            yield chunk

    async def chat(self, body: ChatCompletionBody, request: Request) -> Response:
        return await self._generate(body, request, "chat")

    async def completions(self, body: CompletionBody, request: Request) -> Response:
        return await self._generate(body, request, "completions")

    async def models(self, request: Request) -> ModelList:
        """The served models (base and adapters) that this caller may use; one audit entry per listing."""
        cards = [card for card in [await self.model(model_id) for model_id in self._all_model_ids()] if card is not None]
        visible = self.access.visible_models(request.state.principal, [card.id for card in cards])
        await self.audit_decision(request, "/v1/models", None, Decision(
            True, f"listed {len(visible)} of {len(cards)} models", f"listed: {', '.join(visible) or '(none)'}"))
        return ModelList(data=[card for card in cards if card.id in visible])

    async def model_data(self, model: str, request: Request) -> ModelCard:
        await self.authorize(request, "/v1/models", model, {})
        return await super().model_data(model)

    # ----- LoRA adapters in a storage folder -----

    def _local_adapters(self) -> bool:
        return bool(self.adapters_dir) and not is_remote_path(self.adapters_dir)

    def _adapter_names(self) -> list[str]:
        if not self.adapters_dir:
            return []
        if is_remote_path(self.adapters_dir):
            from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem
            return CloudFileSystem.list_subfolders(self.adapters_dir)
        root = Path(self.adapters_dir)
        return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file()) if root.is_dir() else []

    def _all_model_ids(self) -> list[str]:
        return [model_id for base in self._model_cards
                for model_id in (base, *(f"{base}:{name}" for name in self._adapter_names()))]

    async def _adapter_metadata(self, model_id: str, base_path: str) -> dict:
        from fastapi import HTTPException

        if get_lora_id(model_id) not in self._adapter_names():
            raise HTTPException(404, f"no adapter {get_lora_id(model_id)!r} in {base_path}")
        return {"model_id": model_id, "base_model_id": get_base_model_id(model_id),
                "max_request_context_length": None, "bucket_uri": f"{base_path}/{get_lora_id(model_id)}"}

    # ----- classification by label scoring -----

    @staticmethod
    def _read_artifact(folder: Path) -> Optional[ModelArtifact]:
        return ModelArtifact.read(folder) if (folder / ARTIFACT_FILE).is_file() else None

    def preprocessor(self, artifact: ModelArtifact) -> Preprocessor:
        """The artifact's training preprocessing (cleaning, PII rules), built once per distinct setting
        (adapter artifacts are read per request)."""
        key = artifact.preprocessing.model_dump_json()
        if key not in self._preprocessors:
            self._preprocessors[key] = Preprocessor(artifact.preprocessing)
        return self._preprocessors[key]

    def _artifact_or_none(self, model_id: str) -> Optional[ModelArtifact]:
        """An adapter's own lakeforge_model.json when its folder has one, else the base model's."""
        artifact = None
        if model_id != get_base_model_id(model_id) and self._local_adapters():
            artifact = self._read_artifact(path_inside(self.adapters_dir, get_lora_id(model_id)))
        return artifact or self.base_artifact

    def artifact(self, model_id: str) -> ModelArtifact:
        """The model's artifact, which must be a classification model's (it has labels)."""
        artifact = self._artifact_or_none(model_id)
        if artifact is None or not artifact.labels:
            raise OpenAIHTTPException(400, f"model {model_id!r} is not a classification model (no labels in {ARTIFACT_FILE})",
                                      type="InvalidRequest")
        return artifact

    async def _next_token_logprobs(self, model_id: str, prefix: list[int], token_ids: set[int]) -> dict[int, float]:
        """log P(token | prefix) for the given tokens, from one engine step (`logprob_token_ids`).

        Not prompt log-probs: vLLM's CPU LoRA kernels crash the engine on those (see limits).
        """
        request = CompletionRequest(model=model_id, prompt=prefix, max_tokens=1, temperature=0, logprobs=1,
                                    logprob_token_ids=sorted(token_ids), return_tokens_as_token_ids=True)
        response = await self._get_response(body=request, call_method="completions").__anext__()
        if isinstance(response, ErrorResponse):
            raise OpenAIHTTPException(response.error.code, response.error.message, type=response.error.type)
        top = response.choices[0].logprobs.top_logprobs[0]  # {"token_id:<id>": logprob}
        return {int(key.rsplit(":", 1)[1]): value for key, value in top.items()}

    async def _label_logprobs(self, model_id: str, prompt: list[int], labels: list[list[int]]) -> list[float]:
        """log P(label tokens | prompt) per label: one engine request per distinct label prefix
        (a single request when every label is one token), as the evaluation's teacher forcing."""
        needed: dict[tuple, set[int]] = {}
        for ids in labels:
            for k, token in enumerate(ids):
                needed.setdefault(tuple(ids[:k]), set()).add(token)
        prefixes = list(needed)
        answers = await asyncio.gather(*(self._next_token_logprobs(model_id, prompt + list(prefix), needed[prefix])
                                         for prefix in prefixes))
        table = dict(zip(prefixes, answers))
        return [sum(table[tuple(ids[:k])][token] for k, token in enumerate(ids)) for ids in labels]

    async def classify(self, body: ClassifyRequest, request: Request) -> Response:
        record = request.state.record
        texts = [body.text] if body.text is not None else body.texts
        params = {"texts": len(texts), "prompt_chars": sum(map(len, texts))}
        model_id = await self.admit(request, body.model, params)
        limits = self.settings.limits
        if not 1 <= len(texts) <= limits.max_classify_texts:
            raise OpenAIHTTPException(400, f"texts must hold 1 to {limits.max_classify_texts} items (got {len(texts)})", type="InvalidRequest")
        if params["prompt_chars"] > limits.max_prompt_chars:
            raise OpenAIHTTPException(413, f"texts are {params['prompt_chars']} characters; the limit is {limits.max_prompt_chars}", type="InvalidRequest")
        if self.settings.security.audit.log_prompts:
            record["prompt"] = "\n".join(texts)
        artifact = self.artifact(model_id)
        labels = label_token_ids(self.tokenizer, artifact.labels)
        preprocess = self.preprocessor(artifact)  # the model sees what training saw: cleaned, PII redacted
        prompts = [prompt_ids(self.tokenizer, artifact.system_prompt, preprocess(text)) for text in texts]
        longest = max(map(len, prompts)) + max(map(len, labels))
        if longest > self.settings.max_model_len:
            raise OpenAIHTTPException(400, f"a prompt plus label is {longest} tokens; max_model_len is {self.settings.max_model_len}", type="InvalidRequest")
        scores = await asyncio.gather(*(self._label_logprobs(model_id, prompt, labels) for prompt in prompts))
        results = []
        for logprobs in scores:
            probabilities = label_probabilities(logprobs).tolist()
            best = max(range(len(labels)), key=probabilities.__getitem__)
            results.append({"label": artifact.labels[best],
                            "probabilities": dict(zip(artifact.labels, probabilities)),
                            "logprobs": dict(zip(artifact.labels, logprobs))})
        record["prompt_tokens"] = sum(map(len, prompts))
        record["request_id"] = uuid.uuid4().hex  # ours, not the client's x-request-id: feedback must find one prediction
        self.log_predictions(record["request_id"], model_id, texts, prompts, results)
        answer = ClassifyResponse(object="classification", id=record["request_id"], model=model_id, results=results,
                                  usage={"prompt_tokens": record["prompt_tokens"], "completion_tokens": 0})
        return JSONResponse(answer.model_dump())

    def log_predictions(self, request_id: str, model_id: str, texts: list[str], prompts: list[list[int]],
                        results: list[dict]) -> None:
        """Count the predictions and queue them for the prediction log; nothing here waits for storage."""
        base = get_base_model_id(model_id)
        for result in results:
            self.metrics.predictions.inc(tags={"model": base, "label": result["label"]})
            self.metrics.confidence.observe(result["probabilities"][result["label"]], tags={"model": base})
        if self.prediction_log is None:
            return
        monitoring = self.settings.monitoring
        # An adapter's predictions go under its name, the base model's under the configured version or
        # its folder's name (a registry version's folder is named by its version).
        version = adapter_name(model_id) or monitoring.version or Path(self.settings.model_dir).name
        now, keep_text = utc_now(), monitoring.log_text
        self.prediction_log.append([
            {"request_id": request_id, "index": index, "time": now, "source": "gateway", "model": model_id,
             "version": version, "label": result["label"], "confidence": result["probabilities"][result["label"]],
             "probabilities": result["probabilities"],
             # The prompt's tokens include the system prompt and template: the same offset for every text.
             **text_stats(text, len(prompt)), "text": text if keep_text else None}
            for index, (text, prompt, result) in enumerate(zip(texts, prompts, results))])
        self.metrics.logged.inc(len(results), tags={"log": PREDICTIONS})

    async def feedback(self, body: FeedbackRequest, request: Request) -> Response:
        """Queue the right label of a prediction for the feedback log: 400 for a label the model does
        not have, 404 when this endpoint collects no feedback. Whether the request id was answered is
        checked by the monitor job's join (another replica may have answered it)."""
        model_id = await self.admit(request, body.model, {})
        if self.feedback_log is None:
            raise OpenAIHTTPException(404, "this endpoint does not collect feedback (monitoring.enabled is false)",
                                      type="NotFound")
        labels = self.artifact(model_id).labels
        if body.label not in labels:
            raise OpenAIHTTPException(400, f"label {body.label!r} is not a label of model {model_id!r} "
                                           f"(its labels: {', '.join(labels)})", type="InvalidRequest")
        principal = request.state.principal
        self.feedback_log.append([{"request_id": body.request_id, "index": body.index, "time": utc_now(),
                                   "label": body.label, "source": "gateway", "subject": principal.subject}])
        self.metrics.logged.inc(tags={"log": FEEDBACK})
        answer = FeedbackResponse(object="feedback", request_id=body.request_id, index=body.index, label=body.label)
        return JSONResponse(answer.model_dump(), status_code=202)

    # ----- health -----

    async def health(self) -> Response:
        """503 unless every engine passes its own health check (a dead engine, not just a dead process)."""
        for model_id, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(handle.options(stream=False).check_health.remote(), HEALTH_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - any failure means the engine cannot answer
                # The cause goes to the log only: this route is open to unauthenticated callers.
                logger.warning("engine of %r failed its health check: %r", model_id, error)
                return error_response(503, f"engine of {model_id!r} is unhealthy")
        return JSONResponse(HealthResponse(status="ok", models=list(self._default_serve_handles)).model_dump())


def openapi_schema(app, settings: EndpointSettings) -> dict:
    """The app's OpenAPI schema (FastAPI's, made honest by `serving.api.describe`), built once."""
    if app.openapi_schema is None:
        app.openapi_schema = describe(get_openapi(
            title=f"lakeforge endpoint: {settings.model_id}", version="1", routes=app.routes,
            description="OpenAI-compatible chat and completions, label scoring, on Ray Serve + vLLM. Every route "
                        "outside the open ones needs `Authorization: Bearer <api key or token>`."), settings)
    return app.openapi_schema


def gateway_app(settings: EndpointSettings):
    """ray.serve.llm's FastAPI app (request ids, HTTP metrics) with its error handling replaced by
    `answer_errors`, `invalid_request` and `http_error`, `guard` added last, so it runs first, and the
    schema of `openapi_schema`; a fresh app per build, as routes are bound to it."""
    app = init()
    ray_handlers = [index for index, middleware in enumerate(app.user_middleware)
                    if getattr(middleware.kwargs.get("dispatch"), "__name__", "") == "_handle_application_exceptions"]
    if len(ray_handlers) != 1:
        raise RuntimeError("ray.serve.llm's exception middleware not found: update serving.gateway.gateway_app "
                           "for this Ray version")
    app.user_middleware[ray_handlers[0]] = Middleware(BaseHTTPMiddleware, dispatch=answer_errors)  # same place: innermost
    app.add_exception_handler(Exception, error_answer)  # last resort, for exceptions raised in middleware
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware("http")(guard)
    app.openapi = partial(openapi_schema, app, settings)
    return app


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models", response_model=ModelList, summary="The models this caller may use"),
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=ModelCard, summary="One model",
                                      responses=answers(403, 404)),
    "completions": lambda app: app.post("/v1/completions", response_model=None, summary="Completions of prompts",
                                        responses={**generated(CompletionResponse, "completion"),
                                                   **answers(400, 403, 404, 408, 413, 415)}),
    "chat": lambda app: app.post("/v1/chat/completions", response_model=None, summary="The next message of a chat",
                                 responses={**generated(ChatCompletionResponse, "chat completion"),
                                            **answers(400, 403, 404, 408, 413, 415)}),
    "classify": lambda app: app.post("/v1/classify", response_model=ClassifyResponse,
                                     summary="Label probabilities of texts, by label scoring",
                                     responses=answers(400, 403, 404, 413, 415)),
    "feedback": lambda app: app.post("/v1/feedback", response_model=FeedbackResponse, status_code=202,
                                     summary="The right label of a classified text, for monitoring",
                                     responses=answers(400, 403, 404, 415)),
    "health": lambda app: app.get(HEALTH_ROUTE, response_model=HealthResponse, summary="Whether every engine answers"),
}
