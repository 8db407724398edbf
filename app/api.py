"""OpenAI-compatible HTTP API: POST /v1/chat/completions (streaming or not), GET /v1/models.

It goes through the same ChatService as the browser (moderation, logging, limits). When
logins are on, each call needs a per-user API key (``python -m app.users api-key NAME``)
as ``Authorization: Bearer sk-fc-...``. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator, model_validator

from app.auth import LOCAL_USER, ApiKeyCache, auth_enabled
from app.login_guard import LoginThrottle, LoginThrottled
from app.reply_pump import ReplyPump
from app.service import ChatError
from feedback import training_repo
from feedback.db import session_scope
from model.engine import SamplingParams


# OpenAI's own limit on stop sequences; a longer stop string than this is no real use.
MAX_STOPS, MAX_STOP_CHARS = 4, 200
StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]


class ApiError(Exception):
    """A request refused before anything was written, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# What a message may carry besides role and content: a name (ignored) and, as clients echo them
# back, tool-call fields that are empty. Anything else is refused rather than silently dropped.
EMPTY_MESSAGE_FIELDS = ("tool_calls", "function_call", "refusal", "audio", "annotations")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # 'developer' is OpenAI's newer name for system
    content: StrictStr | list[dict]
    name: Annotated[StrictStr, Field(max_length=200)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, data):
        if isinstance(data, dict):
            for key in EMPTY_MESSAGE_FIELDS:
                if key in data and data[key] in (None, [], ""):
                    data = {k: v for k, v in data.items() if k != key}
                elif key in data:
                    raise ValueError(f"'{key}' in a message is not supported: this server has no tool calling")
        return data

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        """List-of-parts content (as LangChain and others send it) becomes its text; only text parts."""
        if isinstance(content, str):
            return content
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type")
                raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, not "
                                 f"{kind if isinstance(kind, str) else 'this one'}")
            texts.append(part["text"])
        return "\n".join(texts)

    def as_message(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(max_length=200)] | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0, le=4096)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=4096)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what the engines' RNGs take
    # Accepted and without effect here, as for OpenAI's own defaults.
    user: Annotated[StrictStr, Field(max_length=200)] | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None


# Parameters OpenAI has that this server cannot honour (with a value other than their default).
UNSUPPORTED = {
    "tools": "tool (function) calling", "functions": "function calling", "function_call": "function calling",
    "tool_choice": "tool (function) calling", "response_format": "response_format (JSON mode, structured output)",
    "logprobs": "logprobs", "top_logprobs": "logprobs", "logit_bias": "logit_bias",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "audio": "audio output", "modalities": "audio output", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning_effort",
}
DEFAULTS = {"tool_choice": ("none",), "response_format": ({"type": "text"},), "logprobs": (False,),
            "logit_bias": ({},), "frequency_penalty": (0,), "presence_penalty": (0,), "modalities": (["text"],),
            "tools": ([],), "functions": ([],)}


def _refuse_unsupported(data) -> None:
    """A 400 that names the parameter, for what OpenAI supports and this server does not (OpenAI
    too refuses what it cannot honour), and for parameters that OpenAI does not have at all."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if key in UNSUPPORTED and value is not None and value not in DEFAULTS.get(key, ()):
            raise ApiError(400, f"'{key}' is not supported: this server has no {UNSUPPORTED[key]}. "
                                "Leave it out of the request.", param=key, code="unsupported_parameter")
        if key == "n" and isinstance(value, int) and not isinstance(value, bool) and value > 1:
            raise ApiError(400, "'n' above 1 is not supported: this server returns one choice; send one "
                                "request per choice.", param="n", code="unsupported_parameter")
        if key not in ChatRequest.model_fields and key not in UNSUPPORTED:
            raise ApiError(400, f"Unrecognized request argument supplied: '{str(key)[:100]}'.", param=str(key)[:100],
                           code="unknown_parameter")


async def _read_body(request: Request, limit: int) -> bytes:
    """The JSON body, read no further than ``limit`` bytes."""
    # A browser sends text/plain cross-site without asking first (no CORS preflight); JSON it must ask.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "Send the body as JSON, with the header 'Content-Type: application/json'.",
                       code="unsupported_media_type")
    too_big = ApiError(413, f"The body is over the limit of {limit:,} bytes (CHAT_MAX_REQUEST_BYTES).",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> ChatRequest:
    """Every way a body can be malformed is a 400 here, never a server error."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"The body is not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "The body is not valid UTF-8.") from None
    except RecursionError:
        raise ApiError(400, "The body is nested too deeply.") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ApiError(400, f"The body is not valid JSON: {exc}") from None
    try:
        # JSON may escape lone surrogates ("\ud800"); no database stores them, so refuse them here.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "The body contains invalid Unicode (a lone surrogate such as \\ud800).") from None
    _refuse_unsupported(data)
    try:
        return ChatRequest.model_validate({k: v for k, v in data.items() if k not in UNSUPPORTED}
                                          if isinstance(data, dict) else data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"Invalid '{param}': {first['msg']}", param=param) from None


def _chat_error(exc) -> JSONResponse:
    """A ChatError as OpenAI's error body: its status says whose fault it was."""
    return error(exc.status, str(exc), "server_error" if exc.status >= 500 else "invalid_request_error")


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": code}})


def _caller(request: Request, service, keys: ApiKeyCache | None = None,
            throttle: LoginThrottle | None = None) -> str | None:
    """The user an API key belongs to; LOCAL_USER in single-user local mode; None if refused.
    ``keys`` remembers keys verified recently (argon2 costs ~0.1 s a call otherwise). Wrong keys
    count like wrong passwords (``throttle``: per key id and per client address), so guessing
    them is as slow as guessing a login; LoginThrottled when the caller must wait."""
    if not auth_enabled(service.session_factory):
        return LOCAL_USER
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip()
    user_id = key.removeprefix("sk-fc-").split(".", 1)[0] if key.startswith("sk-fc-") and "." in key else ""
    # isdigit() alone takes '²' or Arabic-Indic digits, and 25 digits overflow the id column.
    well_formed = user_id.isascii() and user_id.isdigit() and len(user_id) <= 18
    address = request.client.host if request.client else None
    stamp = throttle.attempt(f"key-{user_id}" if well_formed else None, address) if throttle else None
    name = (keys or ApiKeyCache(ttl_s=0)).user_name(service.session_factory, int(user_id), key) if well_formed else None
    if name is not None and throttle is not None:
        throttle.succeeded(f"key-{user_id}", address, stamp)
    return name


def _known_models(service) -> list[str]:
    with session_scope(service.session_factory) as s:
        names = [v.name for v in training_repo.list_versions(session=s)]
    return [service.engine.version] + [n for n in names if n != service.engine.version]


def build_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1")
    keys = ApiKeyCache(service.settings.api_key_cache_s)
    st = service.settings  # wrong keys are limited by the same rule as wrong passwords
    throttle = LoginThrottle(st.login_failures_per_name, st.login_failures_per_address, st.login_window_s,
                             attempts="API calls", secrets="API keys", names="this key id")

    async def authenticate(request: Request) -> tuple[str | None, JSONResponse | None]:
        """(user, None), or (None, the 401/429 to send)."""
        try:
            user = await run_in_threadpool(_caller, request, service, keys, throttle)
        except LoginThrottled as exc:
            res = error(429, str(exc), "rate_limit_error", code="too_many_failed_keys")
            res.headers["Retry-After"] = str(exc.retry_after_s)
            return None, res
        if user is None:
            return None, error(401, "Missing or invalid API key. Create one with: python -m app.users api-key NAME",
                               "authentication_error", code="invalid_api_key")
        return user, None

    @router.get("/models")
    async def models(request: Request):
        if (refused := (await authenticate(request))[1]) is not None:
            return refused
        names = await run_in_threadpool(_known_models, service)
        return {"object": "list", "data": [_model(n) for n in names]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        if (refused := (await authenticate(request))[1]) is not None:
            return refused
        if model_id not in await run_in_threadpool(_known_models, service):
            return error(404, f"The model '{model_id[:200]}' does not exist. GET /v1/models lists the available ones.",
                         param="model", code="model_not_found")
        return _model(model_id)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        user, refused = await authenticate(request)
        if refused is not None:
            return refused
        try:
            body = _parse(await _read_body(request, service.settings.max_request_bytes))
        except ApiError as exc:
            return error(exc.status, str(exc), param=exc.param, code=exc.code)
        if body.model and body.model not in await run_in_threadpool(_known_models, service):
            return error(400, f"Unknown model '{body.model}'. GET /v1/models lists the available ones.",
                         param="model", code="model_not_found")
        if body.model and body.model != service.engine.version:
            return error(400, f"Model '{body.model}' exists but is not the one being served "
                              f"('{service.engine.version}'); an admin can promote it.", param="model")
        stop = [s for s in ([body.stop] if isinstance(body.stop, str) else (body.stop or [])) if s]  # "" stops nothing
        params = SamplingParams(temperature=0.3 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, top_k=0,
                                max_new_tokens=body.max_completion_tokens or body.max_tokens or 256,
                                repetition_penalty=1.1, seed=body.seed, stop=stop)
        messages = [m.as_message() for m in body.messages]
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        pump = ReplyPump(service.complete(user, messages, params, cancel_key=cid), lambda: service.disconnect(cid))
        pump.watch(request)
        try:
            first = final = await pump.next()
            if not body.stream:
                async for up in pump:
                    final = up
        except ChatError as exc:
            return _chat_error(exc)
        if not body.stream:
            return {"id": cid, "object": "chat.completion", "created": created, "model": final.model_version,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                                 "finish_reason": _finish(final)}],
                    "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                              "total_tokens": final.prompt_tokens + final.completion_tokens}}
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(cid, created, service.engine.version, first, pump, usage),
                                 media_type="text/event-stream")

    return router


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "local"}


def _finish(update) -> str:
    return {"cancelled": "stop", None: "stop"}.get(update.finish_reason, update.finish_reason)


async def _chain(first, pump):
    yield first
    async for up in pump:
        yield up


async def _sse(cid, created, model, first, pump, include_usage: bool = False):
    """Server-sent events in OpenAI's chunk format. With ``include_usage`` (stream_options), every
    chunk carries ``usage: null`` and a last chunk, with no choices, the token counts."""
    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = usage
        return "data: " + json.dumps(body) + "\n\n"

    sent, last = "", first
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for up in _chain(first, pump):
            last = up
            if up.done and up.blocked:
                # Only checked text was ever sent. If moderation replaced the reply at the end, what
                # was sent stays and the stream ends with finish_reason "content_filter".
                piece = "" if sent else up.text
            else:
                piece = up.text[len(sent):] if up.text.startswith(sent) else ""
            if piece:
                sent += piece
                yield chunk({"content": piece})
        yield chunk({}, _finish(last))
        if include_usage:
            yield chunk(None, usage={"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                                     "total_tokens": last.prompt_tokens + last.completion_tokens})
    except ChatError as exc:
        yield "data: " + json.dumps({"error": {"message": str(exc), "type": "server_error"}}) + "\n\n"
    finally:
        pump.abandon()  # cancelled or closed mid-stream: the client went away (no-op after the end)
    yield "data: [DONE]\n\n"
