"""KServe V2 over REST (Open Inference Protocol): a thin adapter over the service.

Routes (``{v}`` paths address a version; a model without one has none)::

    GET  /v2                                       server metadata
    GET  /v2/health/live | /v2/health/ready        200, or 503 (warming up, draining)
    GET  /v2/models/{m}[/versions/{v}]             model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready       200, or 400 when not loaded
    POST /v2/models/{m}[/versions/{v}]/infer       inference (see v2_codec.py); without a
                                                   version, the model's routes and traffic
                                                   choose one (routing.py, from the headers
                                                   and parameters); the x-model-version
                                                   response header names the one that answered
    GET|POST /v2/repository/index                  every model version and its state
    POST /v2/repository/models/{m}/load | unload   repository extension; a load with
                                                   {"parameters": {"source": ...}} deploys a
                                                   new model, an unload with
                                                   {"parameters": {"remove": true}} forgets one

These are plain Starlette routes, not FastAPI ones, and inference is a bare
ASGI endpoint: it reads the body itself and answers with orjson, with no
validation models or request objects in between (it is the hot path; see
docs/benchmarks.md, section "serve").
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ... import __version__
from ...errors import InvalidInputError, RequestTooLargeError
from ..core.documents import DEFAULT_VERSION
from ..core.service import ModelService
from .http_errors import message_of, status_of
from .limits import ParseBudget
from .repository import EXTENSIONS, index, load_model, unload_model
from .v2_codec import encode_response, parse_request

JSON = "application/json"
HEADER_LENGTH = "inference-header-content-length"
VERSION_HEADER = b"x-model-version"  # the version that answered (routing.py chose it)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type=JSON)


def error_response(exc: BaseException) -> Response:
    status, headers = status_of(exc)
    return json_response({"error": message_of(exc)}, status, headers)


def _service(request: Request) -> ModelService:
    return request.app.state.service


async def server_metadata(request: Request) -> Response:
    return json_response({"name": "cachemesh", "version": __version__, "extensions": EXTENSIONS})


async def live(request: Request) -> Response:
    ok = _service(request).live
    return json_response({"live": ok}, 200 if ok else 503)


async def ready(request: Request) -> Response:
    service = _service(request)
    ok = service.ready
    body: dict[str, Any] = {"ready": ok}
    if service.cluster is not None:
        # etcd lost: the node still serves what it has, so it stays ready, and says so.
        body["degraded"] = service.cluster.degraded
    return json_response(body, 200 if ok else 503)


async def model_metadata(request: Request) -> Response:
    p = request.path_params
    try:
        return json_response(await _service(request).metadata(p["model"], p.get("version")))
    except Exception as exc:
        return error_response(exc)


async def model_ready(request: Request) -> Response:
    p = request.path_params
    try:
        ok = _service(request).is_ready(p["model"], p.get("version"))
    except Exception as exc:
        return error_response(exc)
    return json_response({"name": p["model"], "ready": ok}, 200 if ok else 400)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The inflated body, held to the body limit (``limits.py``): a few kilobytes
    of gzip can inflate to gigabytes."""
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise InvalidInputError(f"the body is not valid {encoding}: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise RequestTooLargeError(
                f"the {encoding} body inflates past the limit of {limit} bytes", limit)
        if not inflater.eof:
            raise InvalidInputError(f"the body is not valid {encoding}: it is truncated")
        return out
    if encoding not in ("", "identity"):
        raise InvalidInputError(f"unsupported Content-Encoding {encoding!r}")
    return body


# Bodies from this size on (and every compressed one) are inflated and parsed in a thread.
OFF_LOOP = 256 * 1024


def _decode(body: bytes, encoding: str, header_length: int | None, max_body: int,
            budget: ParseBudget) -> tuple[Any, Any]:
    if encoding:
        body = _decompress(body, encoding, max_body)
    return parse_request(body, header_length, max_body, budget)


class InferEndpoint:
    """``POST .../infer`` as a bare ASGI app: the hot path makes no Request object and
    crosses no per-request wrappers. Middleware on the root app still applies."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        # Every header, by lower-case name: a model's routes may read any of them.
        headers = {key.decode("latin-1"): value.decode("latin-1")
                   for key, value in scope["headers"]}
        p = scope["path_params"]
        extra: list[tuple[bytes, bytes]] = []
        try:
            header = headers.get(HEADER_LENGTH)
            try:
                header_length = int(header) if header is not None else None
            except ValueError:
                raise InvalidInputError(
                    f"Inference-Header-Content-Length {header!r} is not a number") from None
            body = b"".join(chunks) if len(chunks) != 1 else chunks[0]
            encoding = (headers.get("content-encoding") or "").lower()
            state = scope["app"].state
            if encoding or len(body) >= OFF_LOOP:
                # Off the event loop: health probes and other requests go on meanwhile.
                req, form = await asyncio.to_thread(
                    _decode, body, encoding, header_length, state.service.cfg.max_body,
                    state.parse_budget)
            else:
                req, form = parse_request(body, header_length, state.service.cfg.max_body)
            response = await scope["app"].state.service.infer(
                p["model"], p.get("version"), req, headers=headers)
            version = response.model_version
            if version == DEFAULT_VERSION:
                response.model_version = None  # a model without versions; the header says
            out, json_length = encode_response(response, form)
            status, ctype = 200, b"application/json"
            if version:
                extra.append((VERSION_HEADER, version.encode()))
            if json_length is not None:
                ctype = b"application/octet-stream"
                extra.append((b"inference-header-content-length", str(json_length).encode()))
        except Exception as exc:
            status, more = status_of(exc)
            out, ctype = orjson.dumps({"error": message_of(exc)}), b"application/json"
            extra.extend((k.lower().encode(), v.encode()) for k, v in more.items())
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype), (b"content-length", str(len(out)).encode()), *extra]})
        await send({"type": "http.response.body", "body": out})


async def repository_index(request: Request) -> Response:
    ready_only = False
    if request.method == "POST":
        raw = await request.body()
        if raw.strip():
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return error_response(InvalidInputError("the request body is not valid JSON"))
            ready_only = bool(isinstance(doc, dict) and doc.get("ready"))
    out = []
    for e in index(_service(request), ready_only):
        entry = {"name": e.name, "state": e.state}
        if e.version is not None:
            entry["version"] = e.version
        if e.reason:
            entry["reason"] = e.reason
        out.append(entry)
    return json_response(out)


async def _parameters(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInputError("the request body is not valid JSON") from None
    params = doc.get("parameters") if isinstance(doc, dict) else None
    if params is not None and not isinstance(params, dict):
        raise InvalidInputError("'parameters' must be an object")
    return params or {}


async def repository_load(request: Request) -> Response:
    try:
        await load_model(_service(request), request.path_params["model"],
                         await _parameters(request))
    except Exception as exc:
        return error_response(exc)
    return json_response({})


async def repository_unload(request: Request) -> Response:
    try:
        await unload_model(_service(request), request.path_params["model"],
                           await _parameters(request))
    except Exception as exc:
        return error_response(exc)
    return json_response({})


def routes() -> list[Route]:
    r = []
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", InferEndpoint(), methods=["POST"]),
        ]
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["GET", "POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        *r,
    ]
