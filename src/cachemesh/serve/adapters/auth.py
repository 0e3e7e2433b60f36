"""Authentication over HTTP: which token each path needs, checked before any route runs.

:class:`Authenticate` is ASGI middleware on the root app, so every route gets it,
the FastAPI routers mounted later (datacaches, OpenAI) included, with no code of
their own. For each request it looks up the path's access class in
:data:`RULES` (first match wins; anything unmatched is control, the strictest,
so a route nobody classified is never open by accident), reads the credentials,
asks :class:`~cachemesh.access.Keyring` (which compares in constant time), and
runs the request as the resulting :class:`~cachemesh.access.Principal`, or
answers 401/403 itself without reading the body.

Credentials::

    Authorization: Bearer <token>            the server's tokens (control, inference,
                                             metrics); any other token here counts as
                                             a bucket token (OpenAI clients send
                                             their api_key this way)
    X-Cachemesh-Bucket-Token: <t1>[, <t2>]   tokens of protected buckets

Tokens are never taken from the query string (it ends up in access logs and
proxies' logs).

Protected buckets are enforced further in, where the bucket of a thing is known:
the model service hides a model whose bucket the caller cannot open (404, the
same answer as for a model that does not exist), and the data cache service does
the same for caches (``datacache_service.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ...access import CONTROL, INFERENCE, METRICS, OPEN, Keyring, acting_as
from ...errors import ForbiddenError, UnauthorizedError
from .http_errors import message_of, status_of
from .limits import close_after_early_answer

BUCKET_TOKEN_HEADER = "x-cachemesh-bucket-token"

# (path, match, methods or None for all, access class). "exact" paths match as they
# are; "prefix" paths match the path and everything below it. Paths are matched as
# routing sees them (percent-decoded), so a route and its rule cannot disagree.
RULES: list[tuple[str, str, frozenset[str] | None, str]] = [
    ("/v2/health/live", "exact", None, OPEN),  # probes
    ("/v2/health/ready", "exact", None, OPEN),
    ("/openapi.json", "exact", frozenset({"GET", "HEAD"}), OPEN),  # the API's shape, no data
    ("/docs", "exact", frozenset({"GET", "HEAD"}), OPEN),
    ("/docs/assets", "prefix", frozenset({"GET", "HEAD"}), OPEN),  # Swagger UI's files
    ("/redoc", "exact", frozenset({"GET", "HEAD"}), OPEN),
    ("/ui", "prefix", frozenset({"GET", "HEAD"}), OPEN),  # the page's own files: no data (ui.py)
    ("/metrics", "exact", None, METRICS),  # names every model: a scraper's token
    ("/v2/repository", "prefix", None, CONTROL),  # loads, unloads, deploys, removes
    ("/v2", "exact", None, INFERENCE),  # server metadata
    ("/v2/models", "prefix", None, INFERENCE),
    ("/v1", "prefix", None, INFERENCE),  # OpenAI
    ("/api/v1/blobs", "prefix", frozenset({"GET", "HEAD"}), OPEN),  # peers: serve/adapters/blobs.py
    # node-to-node: the cluster token, checked by forward.py (cluster_routes.py)
    ("/api/v1/cluster", "prefix", frozenset({"POST"}), OPEN),
    ("/api", "prefix", None, CONTROL),
]


def access_of(method: str, path: str) -> str:
    """The access class of a request; control when no rule matches."""
    if "/." in path or "//" in path or "\\" in path or "\x00" in path:
        return CONTROL  # no route has dot segments or empty ones: never open such a path
    for rule_path, match, methods, access in RULES:
        if methods is not None and method not in methods:
            continue
        if path == rule_path or (match == "prefix" and path.startswith(rule_path + "/")):
            return access
    return CONTROL


def credentials(headers: Sequence[tuple[bytes, bytes]]) -> tuple[list[str], list[str]]:
    """(bearer tokens, bucket tokens) of a request's raw ASGI headers."""
    bearer: list[str] = []
    others: list[str] = []
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                bearer.append(token)
        elif key == b"x-cachemesh-bucket-token":
            others.extend(t.strip() for t in value.decode("latin-1").split(",") if t.strip())
    return bearer, others


class Authenticate:
    """ASGI middleware: authenticate, then run the request as its principal."""

    def __init__(self, app: Any, keyring: Keyring) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        access = scope["cachemesh.access"] = access_of(scope.get("method", "GET"), scope["path"])
        bearer, others = credentials(scope["headers"])
        try:
            principal = self.keyring.authenticate(access, bearer, others)
        except (UnauthorizedError, ForbiddenError) as exc:
            await _refuse(exc, scope, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        with acting_as(principal):
            await self.app(scope, receive, send)


async def _refuse(exc: BaseException, scope: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    status, extra = status_of(exc)
    body = orjson.dumps({"error": message_of(exc)})
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    if close_after_early_answer(scope["headers"]):
        headers.append((b"connection", b"close"))  # a body not worth discarding (limits.py)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

