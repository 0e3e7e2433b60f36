"""The OpenAI API over the model service: a thin adapter, usable by the ``openai`` client.

    GET  /v1/models                 every model the caller may see
    GET  /v1/models/{model}         one of them
    POST /v1/completions            prompt -> text (``stream``: server-sent events)
    POST /v1/chat/completions       messages -> text, through the model's chat template
    POST /v1/embeddings             texts -> vectors (``encoding_format`` float or base64)

Requests become the payloads of ``runtimes/generation.py`` and go to the model's
``generate`` or ``stream`` hook through :class:`~.service.ModelService`; any
generative runtime (transformers, ctranslate2) serves them. Options this server
does not implement (``n`` > 1, ``logprobs``, ``echo``, ``suffix``, penalties,
``tools``) are refused with 400 rather than ignored.

Streaming: the first chunk is awaited before the response starts, so that a bad
request (an unknown model, a chat request to a model without a chat template)
gets its 4xx status; later errors arrive as an ``error`` event. When the client
disconnects, Starlette cancels the response, the stream's ``finally`` tells the
worker (``messages.Cancel``), and generation stops within a token.

The version that answers is chosen as for every protocol (``ModelService.route``,
from the request's headers) and named in the ``x-model-version`` header.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``,
with the status codes of ``http_errors.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from ...errors import InvalidInputError, ModelNotFoundError
from ..core.service import ModelService
from .http_errors import encodable, message_of, status_of
from .v2_codec import json_object

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": encodable(message), "type": kind, "param": None,
                                   "code": code}})


def error_response(exc: BaseException) -> Response:
    status, headers = status_of(exc)
    code = "model_not_found" if isinstance(exc, ModelNotFoundError) else None
    return Response(error_body(status, message_of(exc), code), status, headers,
                    media_type="application/json")


class OpenAIRoute(APIRoute):
    """Every error of these routes, FastAPI's own refusals included, in OpenAI's body."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                if request.method == "POST":
                    await _json_body(request)
                return await handler(request)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}"
                    for err in exc.errors())
                return Response(error_body(400, f"invalid request: {problems}"), 400,
                                media_type="application/json")
            except StarletteHTTPException as exc:
                return Response(error_body(exc.status_code, str(exc.detail)), exc.status_code,
                                dict(exc.headers or {}), media_type="application/json")
            except Exception as exc:
                return error_response(exc)

        return route


async def _json_body(request: Request) -> None:
    """Read the body as JSON whatever its Content-Type says (a plain ``curl -d`` sends
    form encoding), with the V2 routes' words for one that is not a JSON object. FastAPI
    then takes it as JSON: the body is kept on the request, the header says so."""
    json_object(await request.body())
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        request.scope["headers"] = [
            *((k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"),
            (b"content-type", b"application/json")]
        with contextlib.suppress(AttributeError):
            del request._headers  # Starlette caches them


router = APIRouter(prefix="/v1", tags=["OpenAI"], route_class=OpenAIRoute)


# -- request bodies -------------------------------------------------------------------

def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (no lone surrogates)") from None
    return text


# Every text that reaches a tokenizer or a template: a lone surrogate (JSON allows
# "\ud800") would fail in the tokenizer's Rust code, as the model's fault (5xx).
Text = Annotated[str, Field(max_length=1_000_000), AfterValidator(_utf8)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, description="only 1 is supported")
    presence_penalty: float = Field(default=0.0, description="only 0 is supported")
    frequency_penalty: float = Field(default=0.0, description="only 0 is supported")
    user: str | None = None

    def refuse_unsupported(self) -> None:
        """400 for an option this server would otherwise have to ignore."""
        refused = [name for name, ok in self._unsupported() if not ok]
        if refused:
            raise InvalidInputError(f"not supported here: {', '.join(refused)}")

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [("n other than 1", self.n == 1),
                ("presence_penalty", self.presence_penalty == 0),
                ("frequency_penalty", self.frequency_penalty == 0)]

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return [_utf8(s) for s in stops]

    def payload(self, max_tokens: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": max_tokens if max_tokens is not None else 16}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.stop:
            out["stop"] = self.stop
        if self.seed is not None:
            out["seed"] = self.seed
        return out


class CompletionRequest(Sampling):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = Field(default=False, description="not supported")
    logprobs: int | None = Field(default=None, description="not supported")
    suffix: str | None = Field(default=None, description="not supported")
    best_of: int | None = Field(default=None, description="only 1 is supported")

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [*super()._unsupported(), ("echo", not self.echo),
                ("logprobs", self.logprobs is None), ("suffix", not self.suffix),
                ("best_of other than 1", self.best_of in (None, 1))]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v or len(v) > 64:
                raise ValueError("a list of 1 to 64 prompts")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_utf8)]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(default=None, description="not supported")
    response_format: dict[str, Any] | None = Field(default=None,
                                                   description="only {\"type\": \"text\"}")

    def _unsupported(self) -> list[tuple[str, bool]]:
        text_only = self.response_format is None or self.response_format == {"type": "text"}
        return [*super()._unsupported(), ("logprobs", not self.logprobs),
                ("tools", not self.tools), ("response_format other than text", text_only)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    input: Text | list[Text]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="not supported")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v or len(v) > 2048:
                raise ValueError("a list of 1 to 2048 texts")
        return v


# -- handlers -------------------------------------------------------------------------

def _service(request: Request) -> ModelService:
    return request.app.state.service


VERSION_HEADER = "x-model-version"  # the version that answered (routing.py chose it)


def _json(data: Any, version: str | None = None) -> Response:
    headers = {VERSION_HEADER: version} if version else None
    return Response(orjson.dumps(data), headers=headers, media_type="application/json")


def _version(service: ModelService, model: str, request: Request) -> str:
    """The version of ``model`` this request goes to (from its headers)."""
    return service.route(model, headers=dict(request.headers)).version


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "cachemesh"}


@router.get("/models")
async def list_models(request: Request) -> Response:
    models = _service(request).list_models()
    return _json({"object": "list", "data": [_model_card(m.name) for m in models]})


@router.get("/models/{model}")
async def get_model(model: str, request: Request) -> Response:
    return _json(_model_card(_service(request).status(model).name))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    body.refuse_unsupported()
    service = _service(request)
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    options = body.payload(body.max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream and len(prompts) != 1:
        raise InvalidInputError("streaming takes one prompt")
    version = _version(service, body.model, request)
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": body.model, "choices": [{"index": 0, "text": text,
                                                      "finish_reason": finish,
                                                      "logprobs": None}]}

        payload = {"kind": "completion", "prompt": prompts[0], **options}
        return await _sse(service, body.model, version, payload, chunk, None,
                          body.stream_options)
    results = await asyncio.gather(*(service.generate(
        body.model, {"kind": "completion", "prompt": p, **options}, version=version)
        for p in prompts))
    choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                "logprobs": None} for i, r in enumerate(results)]
    usage = _usage(sum(r["prompt_tokens"] for r in results),
                   sum(r["completion_tokens"] for r in results))
    return _json({"id": rid, "object": "text_completion", "created": created,
                  "model": body.model, "choices": choices, "usage": usage}, version)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    body.refuse_unsupported()
    service = _service(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    payload = {"kind": "chat", **body.payload(max_tokens),
               "messages": [{"role": m.role, "content": m.text()} for m in body.messages]}
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    version = _version(service, body.model, request)
    if body.stream:
        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": body.model, "choices": [{"index": 0, "delta": delta,
                                                      "finish_reason": finish,
                                                      "logprobs": None}]}

        first = {"id": rid, "object": "chat.completion.chunk", "created": created,
                 "model": body.model, "choices": [{"index": 0, "delta": {
                     "role": "assistant", "content": ""}, "finish_reason": None,
                     "logprobs": None}]}
        return await _sse(service, body.model, version, payload, chunk, first,
                          body.stream_options)
    r = await service.generate(body.model, payload, version=version)
    return _json({"id": rid, "object": "chat.completion", "created": created,
                  "model": body.model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                               "finish_reason": r["finish_reason"], "logprobs": None}],
                  "usage": _usage(r["prompt_tokens"], r["completion_tokens"])}, version)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    if body.dimensions is not None:
        raise InvalidInputError("not supported here: dimensions")
    texts = body.input if isinstance(body.input, list) else [body.input]
    service = _service(request)
    version = _version(service, body.model, request)
    r = await service.generate(body.model, {"kind": "embedding", "input": texts},
                               version=version)
    data = []
    for i, vector in enumerate(r["embeddings"]):
        value: Any = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return _json({"object": "list", "data": data, "model": body.model,
                  "usage": {"prompt_tokens": r["prompt_tokens"],
                            "total_tokens": r["prompt_tokens"]}}, version)


def _event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _sse(service: ModelService, model: str, version: str, payload: dict[str, Any],
               chunk: Callable[[str, str | None], dict[str, Any]],
               first: dict[str, Any] | None, options: StreamOptions | None) -> Response:
    stream = service.stream(model, payload, version=version)
    try:
        head = await anext(stream)  # a bad request fails here, with its own status
    except StopAsyncIteration:
        raise InvalidInputError(f"model {model!r} answered nothing") from None
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(options and options.include_usage)

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _event(first)
            item: dict[str, Any] | None = head
            while item is not None:
                if item.get("text"):
                    yield _event(chunk(item["text"], None))
                if "finish_reason" in item:
                    yield _event(chunk("", item["finish_reason"]))
                    if include_usage:
                        usage = _usage(item.get("prompt_tokens", 0),
                                       item.get("completion_tokens", 0))
                        yield _event({**chunk("", None), "choices": [], "usage": usage})
                item = await anext(stream, None)
        except Exception as exc:  # after the status went out: an error event
            status, _ = status_of(exc)
            yield b"data: " + error_body(status, message_of(exc)) + b"\n\n"
        finally:
            await stream.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      VERSION_HEADER: version})
