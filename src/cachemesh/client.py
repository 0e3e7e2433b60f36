"""ControlClient: the one HTTP client of the control API (``/api/v1``), sync and async.

The command line, the Kubernetes operator and users' programs talk to a running
server through it::

    from cachemesh.client import ControlClient

    with ControlClient("http://node:8008", token="...") as api:
        api.create_datacache("qwen", "hf://Qwen/Qwen2.5-0.5B-Instruct")
        api.wait_datacache("qwen")                 # follows the server's event stream
        api.apply_model({"name": "qwen", "versions": {"v1": {"source": "hf://..."}}})

:class:`AsyncControlClient` has the same methods, as coroutines (``async for`` over
events). Both build their requests with the same functions (:class:`_Call`), so the
two cannot drift apart; only the sending differs.

Errors come back as :mod:`cachemesh.errors`: the status code picks the class
(:data:`ERRORS`), the server's own ``{"error": ...}`` message is the message, with
``(HTTP nnn)`` after it. A server that cannot be reached is a
:class:`~cachemesh.errors.UnavailableError`. Names that become URL path segments are
checked first (``..`` would otherwise name another route).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from . import errors as e
from .store.names import check_name

DEFAULT_URL = "http://127.0.0.1:8008"
DEFAULT_TIMEOUT_S = 120.0
#: Data cache statuses after which nothing changes without a new declaration.
FINAL = ("Available", "Failed")
BUCKET_TOKEN_HEADER = "X-Cachemesh-Bucket-Token"

#: Status code -> error class. The inverse of error_codes.py, where several classes
#: share a code: the class a caller can catch for all of them.
ERRORS: dict[int, type[e.CachemeshError]] = {
    400: e.InvalidInputError,
    401: e.UnauthorizedError,
    403: e.ForbiddenError,
    404: e.NotFoundError,
    409: e.ConflictError,
    413: e.RequestTooLargeError,
    429: e.OverloadedError,
    502: e.SourceError,
    503: e.UnavailableError,
    504: e.RequestTimeoutError,
    507: e.CapacityError,
}


def without_userinfo(url: str) -> str:
    """``url`` without ``user:password@``: what an error message may show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def error_from_response(response: httpx.Response, *, token_sent: bool = True,
                        unauthorized_hint: str | None = None) -> e.CachemeshError:
    """The error of a response with status >= 400, carrying the server's message.
    ``unauthorized_hint``: what a 401's message says after it; by default a hint
    where the token comes from, when none was sent."""
    try:
        body = response.json()
        message = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        message = None
    message = str(message or response.text.strip() or response.reason_phrase)
    code = response.status_code
    if code == 401 and unauthorized_hint is not None:
        message += unauthorized_hint
    elif code == 401 and not token_sent:
        message += " (the server wants a token: CACHEMESH_API_TOKEN)"
    text = f"{message} (HTTP {code})"
    cls = ERRORS.get(code, e.CachemeshError)
    if issubclass(cls, e.UnavailableError):
        retry = response.headers.get("Retry-After")
        try:
            return cls(text, retry_after=float(retry) if retry else None)
        except ValueError:  # an HTTP date: the default wait
            return cls(text)
    if cls is e.UnauthorizedError:
        return e.UnauthorizedError(text, invalid="invalid_token"
                                   in response.headers.get("WWW-Authenticate", ""))
    return cls(text)


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: ``kind`` is its ``event:`` line, ``data`` its JSON."""

    kind: str
    data: dict[str, Any]
    id: str | None = None


class _SSE:
    """Server-sent events from lines (the subset the server writes: id, event, data)."""

    def __init__(self) -> None:
        self._kind, self._id, self._data = "message", None, []  # type: ignore[var-annotated]

    def feed(self, line: str) -> ServerEvent | None:
        if not line:
            if not self._data:
                return None
            event = ServerEvent(self._kind, json.loads("\n".join(self._data)), self._id)
            self._kind, self._id, self._data = "message", None, []
            return event
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self._kind = value
        elif key == "data":
            self._data.append(value)
        elif key == "id":
            self._id = value
        return None


def _seg(value: str, what: str) -> str:
    return quote(check_name(value, what), safe="")


def _drop_none(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


@dataclass(frozen=True)
class _Call:
    """One request of the API: what both clients send."""

    method: str
    path: str
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


# -- the requests ------------------------------------------------------------------------


def _create_datacache(name: str, source: str, bucket: str | None, path: str | None,
                      include: Sequence[str], exclude: Sequence[str], size_gib: float | None,
                      retention_days: float | None, options: Mapping[str, Any] | None,
                      nodes: str | int | Sequence[str] | None, min_copies: int | None) -> _Call:
    body = _drop_none({
        "name": check_name(name, "cache name"), "source": source, "bucket": bucket,
        "path": path, "include": list(include) or None, "exclude": list(exclude) or None,
        "size_gib": size_gib, "retention_days": retention_days,
        "options": dict(options) if options else None,
        # Cluster-wide placement (peer-to-peer issue): sent only when asked for, so a
        # server that does not know them yet is not sent fields it refuses.
        "nodes": list(nodes) if isinstance(nodes, (list, tuple)) else nodes,
        "min_copies": min_copies})
    return _Call("POST", "/api/v1/datacaches", body)


def _list_datacaches(bucket: str | None, usage: bool) -> _Call:
    params = {"bucket": bucket} if bucket else {}
    if usage:
        params["usage"] = "true"
    return _Call("GET", "/api/v1/datacaches", params=params)


def _model_doc(doc: Mapping[str, Any], name: str | None, revision: int | None) -> _Call:
    name = name or doc.get("name")
    if not isinstance(name, str):
        raise e.InvalidInputError("a model document needs a 'name' (or pass name=)")
    headers = {"If-Match": str(revision)} if revision is not None else {}
    return _Call("PUT", f"/api/v1/models/{_seg(name, 'model name')}", dict(doc), headers=headers)


def _deploy(name: str, source: str, runtime: str | None, version: str | None,
            parameters: Mapping[str, Any] | None, eager: bool, bucket: str | None) -> _Call:
    body = _drop_none({"name": check_name(name, "model name"), "source": source,
                       "runtime": runtime, "version": version,
                       "parameters": dict(parameters or {}), "eager": eager, "bucket": bucket})
    return _Call("POST", "/api/v1/models", body)


def _repository(name: str, action: str) -> _Call:
    # The V2 repository extension: the model's serving versions, on this server.
    return _Call("POST", f"/v2/repository/models/{_seg(name, 'model name')}/{action}", {})


class _Base:
    def __init__(self, url: str | None, token: str | None, bucket_tokens: Sequence[str],
                 timeout: float, unauthorized_hint: str | None) -> None:
        self.url = (url or DEFAULT_URL).rstrip("/")
        self.timeout = timeout
        self._token_sent = bool(token)
        self._unauthorized_hint = unauthorized_hint
        self._credentials = (token, tuple(bucket_tokens))  # for a client of another node
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        if bucket_tokens:
            self._headers[BUCKET_TOKEN_HEADER] = ", ".join(bucket_tokens)

    def _request(self, client: httpx.Client | httpx.AsyncClient, call: _Call) -> httpx.Request:
        return client.build_request(call.method, call.path, json=call.body, params=call.params,
                                    headers=call.headers)

    def _error(self, response: httpx.Response) -> e.CachemeshError:
        return error_from_response(response, token_sent=self._token_sent,
                                   unauthorized_hint=self._unauthorized_hint)

    def _unreachable(self, exc: httpx.HTTPError) -> e.UnavailableError:
        if isinstance(exc, httpx.TimeoutException):
            return e.RequestTimeoutError(
                f"the server at {without_userinfo(self.url)} did not answer within"
                f" {self.timeout:g} s ({type(exc).__name__})")
        return e.UnavailableError(
            f"cannot reach the server at {without_userinfo(self.url)}: {type(exc).__name__}")

    def _result(self, call: _Call, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise self._error(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise e.CachemeshError(
                f"{call.method} {call.path}: the server answered {response.status_code}"
                " with a body that is not JSON") from None


class ControlClient(_Base):
    """The control API of one server, over a blocking :class:`httpx.Client`.

    ``token``: the control (API) token, sent as ``Authorization: Bearer``;
    ``bucket_tokens``: the tokens of protected buckets the caller holds;
    ``timeout``: seconds for any one request; ``unauthorized_hint``: what the message
    of a 401 says after the server's (see :func:`error_from_response`). ``transport``
    is httpx's, for tests.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 bucket_tokens: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT_S,
                 verify: Any = True, transport: httpx.BaseTransport | None = None,
                 unauthorized_hint: str | None = None) -> None:
        super().__init__(url, token, bucket_tokens, timeout, unauthorized_hint)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout,
                                  verify=verify, transport=transport)

    @classmethod
    def from_settings(cls, settings: Any, url: str | None = None, **kwargs: Any) -> ControlClient:
        """A client as the settings say: CACHEMESH_URL, CACHEMESH_API_TOKEN,
        CACHEMESH_BUCKET_TOKEN (:class:`~cachemesh.config.Settings`)."""
        return cls(url or settings.serve.url, token=settings.api_token,
                   bucket_tokens=settings.bucket_tokens, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _do(self, call: _Call) -> Any:
        try:
            response = self._http.send(self._request(self._http, call))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._result(call, response)

    # -- data caches --
    def create_datacache(self, name: str, source: str, *, bucket: str | None = None,
                         path: str | None = None, include: Sequence[str] = (),
                         exclude: Sequence[str] = (), size_gib: float | None = None,
                         retention_days: float | None = None,
                         options: Mapping[str, Any] | None = None,
                         nodes: str | int | Sequence[str] | None = None,
                         min_copies: int | None = None) -> dict[str, Any]:
        """Declare a cache and start its pull (answers at once, 202); the same
        declaration again is accepted, another one under the name is a conflict."""
        return self._do(_create_datacache(name, source, bucket, path, include, exclude,
                                          size_gib, retention_days, options, nodes, min_copies))

    def create_datacache_eci(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Declare a cache in ECI's CreateDataCache shape (``Name``, ``DataSource``...)."""
        return self._do(_Call("POST", "/api/v1/datacaches", dict(body)))

    def get_datacache(self, name: str) -> dict[str, Any]:
        """One cache: status, progress, view, and its events."""
        return self._do(_Call("GET", f"/api/v1/datacaches/{_seg(name, 'cache name')}"))

    def list_datacaches(self, bucket: str | None = None, *, usage: bool = False
                        ) -> list[dict[str, Any]]:
        return self._do(_list_datacaches(bucket, usage))["datacaches"]

    def delete_datacache(self, name: str) -> None:
        self._do(_Call("DELETE", f"/api/v1/datacaches/{_seg(name, 'cache name')}"))

    def datacache_events(self, name: str, last_event_id: int | None = None
                         ) -> Iterator[ServerEvent]:
        """The cache's server-sent events until its status is final."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        path = f"/api/v1/datacaches/{_seg(name, 'cache name')}/events"
        parser = _SSE()
        try:
            with self._http.stream("GET", path, headers=headers,
                                   timeout=httpx.Timeout(self.timeout, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def wait_datacache(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Follow the cache's events until it is Available or Failed; its description."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.datacache_events(name):
            if event.kind == "status" and event.data.get("status") in FINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise e.RequestTimeoutError(f"cache {name!r} was not final within {timeout} s")
        return self.get_datacache(name)

    # -- models --
    def list_models(self) -> dict[str, Any]:
        """``{"models": [...], "memory": {...}}``: every model the caller may see."""
        return self._do(_Call("GET", "/api/v1/models"))

    def get_model(self, name: str) -> dict[str, Any]:
        return self._do(_Call("GET", f"/api/v1/models/{_seg(name, 'model name')}"))

    def apply_model(self, doc: Mapping[str, Any], *, name: str | None = None,
                    revision: int | None = None) -> dict[str, Any]:
        """Set a model's document (docs/mesh.md): deploys a new model, or rolls out a
        change and returns once the new versions serve. ``revision``: If-Match."""
        return self._do(_model_doc(doc, name, revision))

    def deploy_model(self, name: str, source: str, *, runtime: str | None = None,
                     version: str | None = None, parameters: Mapping[str, Any] | None = None,
                     eager: bool = False, bucket: str | None = None) -> dict[str, Any]:
        return self._do(_deploy(name, source, runtime, version, parameters, eager, bucket))

    def delete_model(self, name: str) -> None:
        self._do(_Call("DELETE", f"/api/v1/models/{_seg(name, 'model name')}"))

    def load_model(self, name: str) -> None:
        """Load it now (the V2 repository extension); returns once it is ready."""
        self._do(_repository(name, "load"))

    def unload_model(self, name: str) -> None:
        self._do(_repository(name, "unload"))

    # -- jobs and nodes --
    def list_jobs(self) -> list[dict[str, Any]]:
        return self._do(_Call("GET", "/api/v1/jobs"))["jobs"]

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._do(_Call("GET", f"/api/v1/jobs/{_seg(job_id, 'job id')}"))

    def list_nodes(self) -> list[dict[str, Any]]:
        """The nodes of the cluster (a lone server lists itself, the one node there is)."""
        return self._do(_Call("GET", "/api/v1/nodes"))["nodes"]


class AsyncControlClient(_Base):
    """:class:`ControlClient`'s methods as coroutines, over :class:`httpx.AsyncClient`."""

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 bucket_tokens: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT_S,
                 verify: Any = True, transport: httpx.AsyncBaseTransport | None = None,
                 unauthorized_hint: str | None = None) -> None:
        super().__init__(url, token, bucket_tokens, timeout, unauthorized_hint)
        self._verify = verify
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                       timeout=timeout, verify=verify, transport=transport)

    def at(self, url: str) -> AsyncControlClient:
        """A client of another node (``url``: its advertise address), with these
        credentials; the caller closes it."""
        token, bucket_tokens = self._credentials
        return AsyncControlClient(url, token=token, bucket_tokens=bucket_tokens,
                                  timeout=self.timeout, verify=self._verify,
                                  unauthorized_hint=self._unauthorized_hint)

    @classmethod
    def from_settings(cls, settings: Any, url: str | None = None,
                      **kwargs: Any) -> AsyncControlClient:
        return cls(url or settings.serve.url, token=settings.api_token,
                   bucket_tokens=settings.bucket_tokens, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _do(self, call: _Call) -> Any:
        try:
            response = await self._http.send(self._request(self._http, call))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._result(call, response)

    async def create_datacache(self, name: str, source: str, *, bucket: str | None = None,
                               path: str | None = None, include: Sequence[str] = (),
                               exclude: Sequence[str] = (), size_gib: float | None = None,
                               retention_days: float | None = None,
                               options: Mapping[str, Any] | None = None,
                               nodes: str | int | Sequence[str] | None = None,
                               min_copies: int | None = None) -> dict[str, Any]:
        return await self._do(_create_datacache(name, source, bucket, path, include, exclude,
                                                size_gib, retention_days, options, nodes,
                                                min_copies))

    async def create_datacache_eci(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._do(_Call("POST", "/api/v1/datacaches", dict(body)))

    async def get_datacache(self, name: str) -> dict[str, Any]:
        return await self._do(_Call("GET", f"/api/v1/datacaches/{_seg(name, 'cache name')}"))

    async def list_datacaches(self, bucket: str | None = None, *, usage: bool = False
                              ) -> list[dict[str, Any]]:
        return (await self._do(_list_datacaches(bucket, usage)))["datacaches"]

    async def delete_datacache(self, name: str, *, cluster: bool = False) -> None:
        """Remove the cache from the node; ``cluster``: its cluster-wide declaration too
        (the other nodes keep their copies)."""
        await self._do(_Call("DELETE", f"/api/v1/datacaches/{_seg(name, 'cache name')}",
                             params={"cluster": "true"} if cluster else {}))

    async def datacache_events(self, name: str, last_event_id: int | None = None
                               ) -> AsyncIterator[ServerEvent]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        path = f"/api/v1/datacaches/{_seg(name, 'cache name')}/events"
        parser = _SSE()
        try:
            async with self._http.stream("GET", path, headers=headers,
                                         timeout=httpx.Timeout(self.timeout, read=None)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise self._error(r)
                async for line in r.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def wait_datacache(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        async for event in self.datacache_events(name):
            if event.kind == "status" and event.data.get("status") in FINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise e.RequestTimeoutError(f"cache {name!r} was not final within {timeout} s")
        return await self.get_datacache(name)

    async def get_nodes(self) -> dict[str, Any]:
        """``GET /api/v1/nodes`` whole: ``nodes``, and ``cluster`` (None on a lone node)."""
        return await self._do(_Call("GET", "/api/v1/nodes"))

    async def list_models(self) -> dict[str, Any]:
        return await self._do(_Call("GET", "/api/v1/models"))

    async def get_model(self, name: str) -> dict[str, Any]:
        return await self._do(_Call("GET", f"/api/v1/models/{_seg(name, 'model name')}"))

    async def apply_model(self, doc: Mapping[str, Any], *, name: str | None = None,
                          revision: int | None = None) -> dict[str, Any]:
        return await self._do(_model_doc(doc, name, revision))

    async def deploy_model(self, name: str, source: str, *, runtime: str | None = None,
                           version: str | None = None,
                           parameters: Mapping[str, Any] | None = None,
                           eager: bool = False, bucket: str | None = None) -> dict[str, Any]:
        return await self._do(_deploy(name, source, runtime, version, parameters, eager, bucket))

    async def delete_model(self, name: str) -> None:
        await self._do(_Call("DELETE", f"/api/v1/models/{_seg(name, 'model name')}"))

    async def load_model(self, name: str) -> None:
        await self._do(_repository(name, "load"))

    async def unload_model(self, name: str) -> None:
        await self._do(_repository(name, "unload"))

    async def list_jobs(self) -> list[dict[str, Any]]:
        return (await self._do(_Call("GET", "/api/v1/jobs")))["jobs"]

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await self._do(_Call("GET", f"/api/v1/jobs/{_seg(job_id, 'job id')}"))

    async def list_nodes(self) -> list[dict[str, Any]]:
        return (await self._do(_Call("GET", "/api/v1/nodes")))["nodes"]
