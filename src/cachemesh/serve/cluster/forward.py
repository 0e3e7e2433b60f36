"""Any node answers any HTTP request: forwarding to the node that holds the model.

:class:`Forward` is ASGI middleware on the root app, inside authentication and the
body limit (``app.py``). On one node (``service.cluster`` is None) it only strips the
internal headers below and passes the request on. In a cluster, for each request:

- **from another node** (``cachemesh-forwarded-by`` present): it must carry the cluster
  token (``cachemesh-cluster-token``, compared in constant time), else 401 and
  ``cachemesh_forwards_total{outcome="refused"}``; it is served here, loading the model
  if need be, and never forwarded again: **at most one hop**.
- **from outside**: the inbound copies of both headers are dropped (a caller cannot
  pose as a node, and the token never passes through); the model and version are read
  (the V2 path; the ``model`` of an OpenAI body; the version as ``ModelService.route``
  picks it), ``ClusterPlacer.locate`` says which node serves it, and the request is
  served here or sent there once, its body as received and the answer streamed back
  as it comes (SSE included), with the caller's own credentials.
  The version chosen here is the one that answers, here or there, so that a traffic
  split is drawn once: a V2 inference path gets it (``/versions/{v}``), and every
  forwarded request carries it (``cachemesh-forwarded-version``, read by
  ``ModelService.route``; dropped from requests from outside, like the other two).
  Metadata and readiness reads, and the control API's runtime stats
  (``GET /api/v1/models/{m}/stats``), go to a ready copy elsewhere if there is one;
  else they are answered here and never start a load, except a metadata read on a node
  that has not pulled the version's files (cluster mode pulls on placement): it is
  placed like an inference (one load in the cluster) and answered where it loaded.

Every answer carries ``cachemesh-node`` (the node that answered) and, where the answer
names a version (``x-model-version``), ``cachemesh-model-version``.

The retry rule (one for HTTP and gRPC, ``placer.with_retries``): a request that never
reached its node (connection refused, the node gone before it accepted) goes to another
copy; one that reached it and then lost it (the node died, the connection broke) is not
replayed: 503 if nothing was answered yet, else the answer ends there, a stream of
server-sent events with a last ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from ...errors import (
    CachemeshError,
    DrainingError,
    NodeLostError,
    NodeUnreachableError,
    UnauthorizedError,
)
from ..adapters.http_errors import message_of, status_of
from ..core.service import PINNED_VERSION
from .placer import (
    FORWARDED_BY,
    NODE_HEADER,
    REFUSED_HEADER,
    TOKEN_HEADER,
    VERSION_HEADER,
    ClusterPlacer,
    node_tls,
    placer_of,
)

if TYPE_CHECKING:
    from ..core.service import ModelService

_FORWARDED_BY = FORWARDED_BY.encode()
_TOKEN = TOKEN_HEADER.encode()
_PINNED = PINNED_VERSION.encode()
_INTERNAL = frozenset({_FORWARDED_BY, _TOKEN, _PINNED})
# Not passed on, either way: they describe one connection, not the request.
_HOP_BY_HOP = frozenset({b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te",
                         b"trailer", b"upgrade", b"proxy-connection", *_INTERNAL})
_OPENAI_BODIES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


def token_ok(presented: str | None, token: str | None) -> bool:
    return bool(presented and token) and hmac.compare_digest(
        presented.encode(), token.encode())  # type: ignore[union-attr]


class Forward:
    """ASGI middleware: serve here, or forward once to the node that holds the model."""

    def __init__(self, app: Any, service: ModelService) -> None:
        self.app = app
        self.service = service
        self._http: httpx.AsyncClient | None = None

    def client(self, placer: ClusterPlacer) -> httpx.AsyncClient:
        """One client for every forward (kept-alive connections to the other nodes)."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=2.0), trust_env=False,
                limits=httpx.Limits(max_keepalive_connections=64),
                verify=node_tls(placer.cluster))
        return self._http

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        hop = token = None
        pinned: bytes | None = None
        if any(k in _INTERNAL for k, _ in headers):
            for k, v in headers:
                if k == _FORWARDED_BY:
                    hop = v.decode("latin-1")
                elif k == _TOKEN:
                    token = v.decode("latin-1")
                elif k == _PINNED:
                    pinned = v
            scope = dict(scope, headers=[(k, v) for k, v in headers if k not in _INTERNAL])
        placer = placer_of(self.service)
        if placer is None:
            await self.app(scope, receive, send)
            return
        tagged = _tagging(send, placer.name)
        if hop is not None:
            if not token_ok(token, placer.cluster.token):
                self.service.metrics.forwards.labels("refused").inc()
                await _answer_error(send, UnauthorizedError(
                    f"a request forwarded by {hop!r} without the cluster token"), placer.name)
                return
            if placer.draining and self.service.draining:
                # Not run: the sender may send it to another copy (the retry rule).
                await _answer_error(send, DrainingError(
                    f"node {placer.name!r} is draining"), placer.name, refused=True)
                return
            scope["cachemesh.forwarded_by"] = hop
            if pinned is not None:  # the version the sending node drew (service.route)
                scope["headers"] = [*scope["headers"], (_PINNED, pinned)]
            await self.app(scope, receive, tagged)
            return
        await self._route(scope, receive, send, tagged, placer)

    async def _route(self, scope: Any, receive: Any, send: Any, tagged: Any,
                     placer: ClusterPlacer) -> None:
        path, method = scope["path"], scope["method"]
        body: bytes | None = None
        model = label = None
        load = describe = False
        parts = path.split("/")
        if path.startswith("/v2/models/") and len(parts) >= 4:
            model = parts[3]
            label = parts[5] if len(parts) >= 6 and parts[4] == "versions" else None
            load = method == "POST" and parts[-1] == "infer"
            describe = method == "GET" and (len(parts) == 4 or (
                len(parts) == 6 and parts[4] == "versions"))  # V2 model metadata
        elif (method == "GET" and len(parts) == 6 and parts[:4] == ["", "api", "v1", "models"]
              and parts[5] == "stats"):
            model = parts[4]  # a control read of the loaded copies: where they are
        elif method == "POST" and path in _OPENAI_BODIES:
            body = await _read_body(receive)
            try:
                found = orjson.loads(body).get("model")
                model = found if isinstance(found, str) else None
            except (orjson.JSONDecodeError, AttributeError):
                model = None
            load = True
        if model:
            try:  # a label, an alias, or the routes' and traffic's choice
                label = self.service.route(model, label, headers=_text(scope)).version
            except CachemeshError:
                model = None  # unknown here: the route answers (404)
        if not model:
            await self.app(scope, _replay(body, receive) if body is not None else receive, tagged)
            return
        assert label is not None
        if load:
            # The version chosen here is the one that answers, here or there: the split
            # is drawn once (a metadata or readiness read keeps its model-level path).
            scope = dict(scope, headers=[*scope["headers"], (_PINNED, label.encode())])
            if path.startswith("/v2/models/") and label != "default":
                rest = "/".join(parts[6:] if parts[4:5] == ["versions"] else parts[4:])
                scope.update(path=f"/v2/models/{model}/versions/{label}/{rest}", raw_path=None)
        if not placer.draining and placer.here(model, label):  # the common case: no hop
            await self.app(scope, _replay(body, receive) if body is not None else receive,
                           tagged)
            return
        if not load:
            # Served here without a ready copy elsewhere: a readiness read always; a
            # metadata read when this node has the version's files (read from them, or
            # from a load here). One without them is placed like an inference.
            if not placer.copies(model, label, "ready") and (
                    not describe or placer.has_files(model, label)):
                await self.app(scope, receive, tagged)
                return
        if body is None:
            body = await _read_body(receive)

        async def serve(node: str) -> None:
            if node == placer.name:
                await self.app(scope, _replay(body, receive), tagged)
            else:
                await self._forward(scope, body, node, label, send, placer)

        try:
            await placer.with_retries(model, label, serve)
        except CachemeshError as exc:
            if isinstance(exc, NodeLostError):
                self.service.metrics.forwards.labels("lost").inc()
            await _answer_error(send, exc, placer.name)

    async def _forward(self, scope: Any, body: bytes, node: str, label: str, send: Any,
                       placer: ClusterPlacer) -> None:
        """Send the request to ``node`` and stream its answer back (see the docstring)."""
        record = await placer.record(node)
        raw = scope.get("raw_path") or scope["path"].encode()
        url = record.advertise.rstrip("/") + raw.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        headers += [(_FORWARDED_BY, placer.name.encode()),
                    (_TOKEN, placer.cluster.token.encode()), (_PINNED, label.encode())]
        http = self.client(placer)
        request = http.build_request(scope["method"], url, headers=headers, content=body)
        started = time.perf_counter()
        try:
            reply = await http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NodeUnreachableError(f"node {node!r} did not take the request: {exc}",
                                       node) from exc
        except httpx.HTTPError as exc:
            raise NodeLostError(f"node {node!r} was lost while it held the request: {exc}",
                                node) from exc
        if reply.headers.get(REFUSED_HEADER):
            await reply.aclose()
            raise NodeUnreachableError(f"node {node!r} refused the request: it is draining",
                                       node)
        outcome = "ok" if reply.status_code < 500 else "error"
        sse = reply.headers.get("content-type", "").startswith("text/event-stream")
        try:
            await send({"type": "http.response.start", "status": reply.status_code,
                        "headers": [(k, v) for k, v in reply.headers.raw
                                    if k.lower() not in _HOP_BY_HOP]})
            try:
                async for chunk in reply.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                outcome = "lost"
                if sse:
                    error = {"error": {"message": f"node {node!r} was lost mid-stream: {exc}",
                                       "type": "node_lost"}}
                    await send({"type": "http.response.body", "more_body": True,
                                "body": b"data: " + orjson.dumps(error) + b"\n\n"})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await reply.aclose()
            placer.service.metrics.forwards.labels(outcome).inc()
            placer.service.metrics.forward_latency.observe(time.perf_counter() - started)


def _text(scope: Any) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes | None, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body or b"", "more_body": False}
        return await receive()

    return replayed


def _tagging(send: Any, node: str) -> Any:
    """``send`` that names this node, and the version, in the answer's headers."""
    name = node.encode()

    async def tagged(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            version = next((v for k, v in headers if k == b"x-model-version"), None)
            headers.append((NODE_HEADER.encode(), name))
            if version is not None:
                headers.append((VERSION_HEADER.encode(), version))
            message = dict(message, headers=headers)
        await send(message)

    return tagged


async def _answer_error(send: Any, exc: BaseException, node: str, *,
                        refused: bool = False) -> None:
    status, extra = status_of(exc)
    body = orjson.dumps({"error": message_of(exc)})
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (NODE_HEADER.encode(), node.encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in extra.items()]
    if refused:
        headers.append((REFUSED_HEADER.encode(), b"draining"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
