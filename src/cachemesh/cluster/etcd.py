"""etcd v3 through its JSON gateway, over httpx: the :class:`~.kv.KV` a server uses.

Why this client (evaluated for issue 17, on this project's venv: grpcio 1.85,
protobuf 6.33, tritonclient[grpc]; against Debian's etcd 3.4.23):

- **aetcd** 1.0.0 (June 2026; asyncio on grpc.aio; grpcio >1.66, protobuf >4 <8). Works
  against etcd 3.4 here, but its generated code is protobuf 5.27, which a protobuf 7
  runtime would refuse (it would need ``protobuf<7``). Disqualifying: it has no TLS
  (``insecure_channel`` only; TLS is its open issue #37, with a pull request open since
  2022) and takes one ``host, port``, not a list of endpoints.
- **etcetra** 0.1.19 (April 2024, the last): pins ``grpcio==1.62.2`` and
  ``protobuf~=4.25.3``; it cannot be installed beside the venv's grpcio and protobuf.
- **etcd3** (python-etcd3) 0.12.0 (March 2020, the last): synchronous, and its generated
  code fails to import on protobuf >= 4 ("Descriptors cannot be created directly").
- **etcd3gw** 2.7.0 (OpenStack, June 2026): maintained, speaks this same gateway, but is
  synchronous (requests; watches on threads): every call would need a thread.
- **etcd3aio** 0.3.0 (March 2026, its only release): asyncio and TLS, but it dials an
  ``ipv4:`` target (a DNS name such as ``etcd.kube-system.svc`` does not resolve), inserts
  its own ``google.api`` package first on ``sys.path``, and its generated code needs
  protobuf >= 6.31 while it declares >= 5.26.

Chosen: etcd's own gRPC gateway, which etcd 3.4 and later serve at ``/v3/`` on the client
port: the same RPCs, revisions, compare-and-put (``txn``), watches and leases that the
gRPC clients use, as JSON. Over httpx (already cachemesh's HTTP client) it is asyncio
throughout, adds no dependency and no grpcio/protobuf constraint, does TLS and client
certificates with an ``ssl`` context, fails over across several endpoints, and reconnects
with our own bounded backoff (gRPC's grows to 120 s). The price is the wire mapping in
this module (keys and values base64, int64 as strings, a watch as a streamed response of
JSON lines) and about twice the bytes of protobuf per call, negligible at the write
budgets of ``keys.py``. Leader election is built on these primitives (``election.py``)
rather than on the gateway's election API, so that the fake runs the same logic.

Retry rule: a request that could not connect is tried on the next endpoint at once; one
that may have reached etcd (a timeout, a cut connection) raises ClusterUnavailableError
and the caller reads before it writes again. Watches reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ..config import ClusterSettings
from ..errors import (
    ClusterError,
    ClusterUnavailableError,
    HistoryLostError,
    LeaseLostError,
    RevisionConflictError,
)
from .kv import KV, Backoff, KeyValue, Snapshot, WatchEvent, prefix_end

log = logging.getLogger(__name__)

# gRPC status codes the gateway returns in its error bodies.
_UNAVAILABLE_CODES = {1, 4, 10, 14}  # cancelled, deadline, aborted, unavailable
_NOT_FOUND = 5
_OUT_OF_RANGE = 11
# Keys per range request; a larger prefix is read in pages at one revision.
_PAGE = 1000


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _int(value: Any) -> int:
    return int(value) if value else 0


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(raw.get("key")).decode("utf-8", "backslashreplace"),
        value=_unb64(raw.get("value")),
        create_revision=_int(raw.get("create_revision")),
        mod_revision=_int(raw.get("mod_revision")),
        version=_int(raw.get("version")),
        lease=_int(raw.get("lease")),
    )


def tls_context(cacert: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """Trust ``cacert`` (else the system's CAs); present ``cert``/``key`` when given."""
    try:
        ctx = ssl.create_default_context(cafile=str(cacert) if cacert else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ClusterError(f"cannot load the etcd TLS files ({cacert}, {cert}): {exc}") from exc
    return ctx


class EtcdKV(KV):
    """A real etcd, through the JSON gateway of one of ``endpoints`` (``HOST:PORT``)."""

    def __init__(self, endpoints: Sequence[str], *, tls: ssl.SSLContext | None = None,
                 timeout: float = 5.0, backoff_cap: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        scheme = "https" if tls is not None else "http"
        self._tls = tls is not None
        self._urls = [f"{scheme}://{e}" for e in endpoints]
        self._current = 0
        self._timeout = timeout
        self._backoff_cap = backoff_cap
        # trust_env=False: proxies from the environment must not carry etcd's traffic.
        self._http = httpx.AsyncClient(verify=tls if tls is not None else True,
                                       timeout=timeout, trust_env=False)
        self._cluster_id: str | None = None
        # Bumped each time another etcd answers than before (its data lost, or swapped).
        self.generation = 0

    @classmethod
    def from_settings(cls, settings: ClusterSettings, *, timeout: float = 5.0) -> EtcdKV:
        tls = (tls_context(settings.etcd_cacert, settings.etcd_cert, settings.etcd_key)
               if settings.tls else None)
        return cls(settings.endpoints, tls=tls, timeout=timeout)

    @property
    def endpoints(self) -> str:
        return ",".join(self._urls)

    @property
    def cluster_id(self) -> str | None:
        return self._cluster_id

    # -- the wire -------------------------------------------------------------------

    def _seen(self, header: dict[str, Any] | None) -> str | None:
        cluster = (header or {}).get("cluster_id")
        if cluster and cluster != self._cluster_id:
            if self._cluster_id is not None:
                self.generation += 1
                log.warning("etcd at %s is another cluster than before (id %s, was %s)",
                            self.endpoints, cluster, self._cluster_id)
            self._cluster_id = cluster
        return cluster

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for _ in range(len(self._urls)):
            url = self._urls[self._current] + path
            try:
                response = await self._http.post(url, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last = exc
                self._current = (self._current + 1) % len(self._urls)
                continue
            except httpx.TransportError as exc:
                hint = (" (over TLS 1.3 a refused client certificate looks like this: check"
                        " CACHEMESH_ETCD_CERT/KEY)" if self._tls and not str(exc) else "")
                raise ClusterUnavailableError(
                    f"etcd at {url} did not answer {path}: {exc!r}{hint}") from exc
            except ssl.SSLError as exc:  # httpx lets a refused handshake through as it is
                raise ClusterError(f"etcd at {url} refused the TLS handshake ({exc.reason});"
                                   " check CACHEMESH_ETCD_CACERT/CERT/KEY") from exc
            data = self._decode(response, path)
            if "result" in data and isinstance(data["result"], dict):
                data = data["result"]  # a streaming RPC (keepalive) answered once
            self._seen(data.get("header"))
            return data
        raise ClusterUnavailableError(
            f"cannot reach etcd at {self.endpoints}: {last!r}") from last

    @staticmethod
    def _decode(response: httpx.Response, path: str) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        error = data.get("error")
        if response.status_code == 200 and not error:
            return data
        if isinstance(error, dict):  # a streaming RPC's error shape
            code, message = _int(error.get("grpc_code")), error.get("message", "")
        else:
            code, message = _int(data.get("code")), data.get("message") or error or ""
        message = message or f"HTTP {response.status_code}"
        if response.status_code == 404 and not code:
            message += " (etcd before 3.4 serves no /v3/ gateway)"
        if code in _UNAVAILABLE_CODES or response.status_code in (502, 503, 504):
            raise ClusterUnavailableError(f"etcd cannot serve {path} now: {message}")
        if code == _NOT_FOUND and "lease" in message:
            raise LeaseLostError(f"etcd {path}: {message}")
        if code == _OUT_OF_RANGE:
            raise HistoryLostError(f"etcd {path}: {message}")
        raise ClusterError(f"etcd refused {path}: {message} (code {code})")

    # -- keys -----------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> Snapshot:
        start, end = prefix.encode(), prefix_end(prefix.encode())
        kvs: list[KeyValue] = []
        revision = 0
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": _PAGE}
            if revision:
                body["revision"] = revision  # later pages read the same snapshot
            data = await self._call("/v3/kv/range", body)
            revision = revision or _int(data["header"].get("revision"))
            page = [_kv(raw) for raw in data.get("kvs") or []]
            kvs.extend(page)
            if not data.get("more") or not page:
                return Snapshot(kvs=kvs, revision=revision)
            start = page[-1].key.encode() + b"\0"

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self._call("/v3/kv/put", body)
        return _int(data["header"].get("revision"))

    async def _txn_on(self, key: str, mod_revision: int,
                      success: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        compare = ({"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                    "create_revision": "0"} if mod_revision == 0 else
                   {"key": _b64(key), "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(mod_revision)})
        data = await self._call("/v3/kv/txn", {
            "compare": [compare],
            "success": [success],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        return bool(data.get("succeeded")), data

    async def put_if(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> int:
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        ok, data = await self._txn_on(key, mod_revision, {"request_put": put})
        if not ok:
            raise RevisionConflictError(key, mod_revision, self._found(data))
        return _int(data["header"].get("revision"))

    @staticmethod
    def _found(data: dict[str, Any]) -> int:
        responses = data.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        return _kv(kvs[0]).mod_revision if kvs else 0

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        if mod_revision is None:
            data = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
            return _int(data.get("deleted")) > 0
        ok, data = await self._txn_on(
            key, mod_revision, {"request_delete_range": {"key": _b64(key)}})
        if ok:
            return True
        actual = self._found(data)
        if actual == 0:
            return False
        raise RevisionConflictError(key, mod_revision, actual)

    # -- watches --------------------------------------------------------------------

    async def watch(self, key: str, *, prefix: bool = False,
                    start_revision: int) -> AsyncIterator[WatchEvent]:
        next_revision = max(1, start_revision)
        cluster = self._cluster_id
        backoff = Backoff(cap=self._backoff_cap)
        create: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            create["range_end"] = _b64(prefix_end(key.encode()))
        timeout = httpx.Timeout(self._timeout, read=None)
        while True:
            url = self._urls[self._current] + "/v3/watch"
            create["start_revision"] = str(next_revision)
            try:
                async with self._http.stream("POST", url, json={"create_request": create},
                                             timeout=timeout) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self._decode(response, "/v3/watch")
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        result = self._watch_message(json.loads(line), key)
                        seen = self._seen(result.get("header"))
                        if cluster is None:
                            cluster = seen
                        elif seen and seen != cluster:
                            raise HistoryLostError(
                                f"watch on {key}: another etcd answers (its data was lost)",
                                _int(result["header"].get("revision")))
                        if result.get("created"):
                            now = _int(result["header"].get("revision"))
                            if now < next_revision - 1:
                                raise HistoryLostError(
                                    f"watch on {key}: etcd is at revision {now}, before the"
                                    f" {next_revision - 1} already seen (its data was lost)", now)
                            backoff.reset()
                        for raw in result.get("events") or []:
                            event = WatchEvent(
                                kind="delete" if raw.get("type") == "DELETE" else "put",
                                kv=_kv(raw["kv"]))
                            next_revision = event.revision + 1
                            yield event
            except ssl.SSLError as exc:
                raise ClusterError(f"etcd at {url} refused the TLS handshake ({exc.reason});"
                                   " check CACHEMESH_ETCD_CACERT/CERT/KEY") from exc
            except (httpx.TransportError, ClusterUnavailableError) as exc:
                log.info("watch on %s broke (%r); resuming at revision %d", key, exc,
                         next_revision)
                self._current = (self._current + 1) % len(self._urls)
            await asyncio.sleep(backoff.next())

    @staticmethod
    def _watch_message(message: dict[str, Any], key: str) -> dict[str, Any]:
        if "error" in message:
            error = message["error"]
            text = error.get("message", error) if isinstance(error, dict) else error
            raise ClusterUnavailableError(f"watch on {key}: {text}")
        result: dict[str, Any] = message.get("result") or {}
        if result.get("canceled"):
            compacted = _int(result.get("compact_revision"))
            if compacted:
                raise HistoryLostError(
                    f"watch on {key}: history before revision {compacted} was compacted",
                    compacted)
            raise ClusterUnavailableError(
                f"watch on {key} cancelled by etcd: {result.get('cancel_reason', '')}")
        return result

    # -- leases ---------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": ttl})
        if data.get("error"):
            raise ClusterError(f"etcd refused a lease of {ttl} s: {data['error']}")
        return _int(data.get("ID"))

    async def keep_alive(self, lease: int) -> int:
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = _int(data.get("TTL"))
        if ttl <= 0:
            raise LeaseLostError(f"lease {lease:x} is gone (expired, revoked, or etcd lost it)")
        return ttl

    async def revoke_lease(self, lease: int) -> bool:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseLostError:
            return False
        return True

    async def lease_ttl(self, lease: int) -> int | None:
        data = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        ttl = int(data.get("TTL") or -1)
        return ttl if ttl >= 0 else None

    async def close(self) -> None:
        await self._http.aclose()
