"""What a server does as a node of a cluster: :class:`ClusterContext`.

Created by :class:`~.service.ModelService` when ``CACHEMESH_CLUSTER`` (``--cluster``) is
set, and held as ``service.cluster`` (None on a lone node). It owns:

- the etcd client (``cluster/etcd.py``), the node's membership (its lease-bound record,
  ``cluster/membership.py``) and its place in the leader election (``cluster/election.py``);
- the model registry in etcd (``registry_etcd.py``), which replaces the store's SQLite one:
  declarations are cluster-wide;
- the views of ``nodes/`` and ``copies/`` (``cluster/view.py``), read from memory by
  :meth:`nodes` and :meth:`copies_of`;
- the copy records: ``copies/{model}/{version}/{node}`` bound to the node's lease, one per
  version this node holds (loading, ready, draining), deleted when the last copy goes, and
  the node record's ``copies``, memory and rates (written by membership at most once per
  ``RECORD_MIN_INTERVAL_S``). They are derived from the service's state every
  ``SYNC_INTERVAL_S`` (a diff against what was written) rather than hooked into each place
  that changes a copy: loading, pool and placement stay free of cluster code, and a
  write that failed (etcd down) or a lease that was lost is made good by the next diff.

Node-local, never in etcd: the store, data caches, conversions. The node record's
``prepared`` names the versions whose files this node's store holds (a hint placement
prefers: ``node_choice.py``); in cluster mode a node pulls a version's files only when it
is to load it (``deployments.py``). A ``file://`` model source
exists or not on each node: :meth:`can_load_here` says why this node cannot load a model,
and the node record's ``cannot_load`` tells the other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from ...cluster.election import Election
from ...cluster.etcd import EtcdKV
from ...cluster.keys import Keys, part
from ...cluster.kv import KV
from ...cluster.membership import Membership, Rejoin
from ...cluster.records import CopyState, NodeRecord
from ...cluster.view import PrefixView
from ...config import Settings
from ...errors import ClusterError, InvalidInputError, RevisionConflictError
from ...sources import scheme_of
from ..core.documents import ModelDoc, doc_from_spec
from ..core.registry import Change, ModelSpec
from ..core.state import LOADING, READY, UNLOADING
from .registry_etcd import EtcdModelRegistry

if TYPE_CHECKING:
    from ..core.service import ModelService

log = logging.getLogger("cachemesh.cluster")

# Seconds between two diffs of this node's copies against what etcd holds of them.
SYNC_INTERVAL_S = 0.25
# The header a node-to-node call carries the cluster token in (as the peer route).
TOKEN_HEADER = "authorization"


class ClusterContext:
    """This server as a node of the cluster (see the module docstring)."""

    def __init__(self, settings: Settings, *, kv: KV | None = None) -> None:
        cluster = settings.cluster
        cluster.check()  # the token, the TLS files
        # Every call to etcd (keep-alives every TTL/3) would be a line at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.settings = settings
        self.cluster_settings = cluster
        self.kv: KV = kv or EtcdKV.from_settings(cluster, timeout=3.0)
        self.keys = Keys(cluster.prefix)
        self.name = cluster.name_or_host()
        self.token: str = cluster.token or ""
        serve = settings.serve
        host = f"[{serve.host}]" if ":" in serve.host else serve.host
        self.advertise = cluster.advertise_url(serve)
        self.membership = Membership(
            self.kv, home=settings.home, name=self.name, advertise=self.advertise,
            lease_ttl_s=cluster.lease_ttl_s, keys=self.keys, labels=dict(cluster.labels),
            http=f"{host}:{serve.port}",
            grpc=f"{host}:{serve.grpc_port}" if serve.grpc_port else None)
        self.election = Election(self.membership)
        self.registry = EtcdModelRegistry(self.kv, self.keys, settings.home,
                                          degraded=lambda: self.degraded)
        self._nodes = PrefixView(self.kv, self.keys.nodes)
        self._copies = PrefixView(self.kv, self.keys.copies)
        self._written: dict[tuple[str, str], CopyState] = {}
        self._service: ModelService | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._ssl: ssl.SSLContext | None = None

    # -- start and stop -------------------------------------------------------------

    async def start(self, service: ModelService) -> None:
        """Join (NodeNameTakenError: the name is taken; ClusterUnavailableError: no etcd),
        read the declarations, and follow nodes and copies."""
        self._service = service
        await self.membership.start()
        try:
            self.membership.on_rejoin(self._rejoined)
            self.election.start()
            await self.registry.open()
            await self._nodes.load()
            await self._copies.load()
        except BaseException:
            await self.stop()
            raise
        self._nodes.start()
        self._copies.start()
        self._tasks.append(asyncio.get_running_loop().create_task(
            self._sync_copies(), name="cluster-copies"))

    async def stop(self) -> None:
        """Leave: the node record and its copy records go with the lease."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._nodes.stop()
        await self._copies.stop()
        await self.registry.close()
        await self.election.stop()
        await self.membership.stop()
        await self.kv.close()

    async def declare(self, specs: Sequence[ModelSpec | ModelDoc]) -> None:
        """The models given at start (``--model``, ``--config``), written into etcd unless
        there already: an identical document is not written again, and a different one
        declared at run time wins (as on a lone node), with a warning."""
        for item in specs:
            doc = item if isinstance(item, ModelDoc) else doc_from_spec(item)
            found = self.registry.get(doc.name)
            if found is not None:
                if found.doc != doc:
                    log.warning("model %s: the cluster holds another document for it; serving"
                                " that one, not the one given at start", doc.name)
                continue
            try:
                await self.registry.put_doc(doc, revision=0)
            except RevisionConflictError:
                log.warning("model %s: declared by another node meanwhile; serving the"
                            " cluster's document", doc.name)

    def follow(self) -> Coroutine[Any, Any, None]:
        """Apply every declaration another node makes (or removes) to this node's models:
        subscribes now (call it with no ``await`` after the service's ``restore``) and
        returns the coroutine that follows, to run in the background."""
        changes = self.registry.watch(start_revision=self.registry.snapshot().revision + 1)
        return self._follow(changes)

    async def _follow(self, changes: AsyncIterator[Change]) -> None:
        assert self._service is not None
        async with contextlib.aclosing(changes):  # type: ignore[type-var]
            async for change in changes:
                try:
                    await self._service.deployments.follow(change.name, change.doc,
                                                           change.revision)
                except Exception:  # one bad document must not stop following the others
                    log.exception("applying the cluster's change to model %s failed",
                                  change.name)

    # -- what the others read -----------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """etcd cannot be reached: serving goes on, declarations wait (503)."""
        return self.membership.degraded

    async def nodes(self) -> list[NodeRecord]:
        """The live nodes (this one included), by name, as last seen (from a watch)."""
        out = [self.membership.record]  # this node's own, fresher than etcd's copy
        for kv in self._nodes.items.values():
            with contextlib.suppress(ValueError):
                record = NodeRecord.from_bytes(kv.value)
                if record.name != self.name:
                    out.append(record)
        return sorted(out, key=lambda r: r.name)

    def node(self, name: str) -> NodeRecord | None:
        kv = self._nodes.items.get(self.keys.node(name))
        if kv is None:
            return self.membership.record if name == self.name else None
        try:
            return NodeRecord.from_bytes(kv.value)
        except ValueError:
            return None

    def copies_of(self, model: str) -> list[tuple[str, str | None, CopyState]]:
        """Where the copies of ``model`` are: (node, version label, state), from a watch."""
        under = f"{self.keys.copies}{part(model)}/"
        out = []
        for key, kv in self._copies.items.items():
            if not key.startswith(under):
                continue
            version, _, node = key[len(under):].partition("/")
            try:
                state = CopyState.model_validate_json(kv.value)
            except ValueError:
                continue
            out.append((self.keys.name_of(node, ""), self.keys.name_of(version, ""), state))
        return sorted(out, key=lambda x: (x[0], x[1] or ""))

    def can_load_here(self, model: str) -> str | None:
        """Why this node cannot load ``model`` (None: it can): a local source it lacks."""
        assert self._service is not None
        dep = self._service.deployments.by_name.get(model)
        if dep is None:
            return None
        return missing_local_source(dep.doc)

    def can_load_on(self, node: str, model: str) -> str | None:
        """Why ``node`` cannot load ``model``, as its record says (None: it can)."""
        if node == self.name:
            return self.can_load_here(model)
        record = self.node(node)
        if record is None:
            return f"node {node!r} is not in the cluster"
        return dict(record.cannot_load).get(model)

    def client_ssl(self) -> ssl.SSLContext | bool:
        """What a node-to-node HTTPS call verifies the other node with: the cluster's CA
        (``CACHEMESH_CLUSTER_CA``), else the system's CAs."""
        if self.cluster_settings.ca is None:
            return True
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(cafile=str(self.cluster_settings.ca))
            except (OSError, ssl.SSLError) as exc:
                raise InvalidInputError(
                    f"cannot load CACHEMESH_CLUSTER_CA {self.cluster_settings.ca}: {exc}") from exc
        return self._ssl

    def token_headers(self) -> dict[str, str]:
        """The header that carries the cluster token on a call to another node."""
        return {TOKEN_HEADER: f"Bearer {self.token}"}

    def status(self) -> dict[str, Any]:
        s = self.membership.status()
        return {"name": self.name, "state": s.state.value, "degraded": s.degraded,
                "degraded_since": s.degraded_since, "last_error": s.last_error,
                "leader": self.election.is_leader, "rejoins": s.rejoins,
                "data_losses": s.data_losses, "restores": self.registry.restores,
                "etcd": s.etcd}

    @property
    def etcd_errors(self) -> int:
        return (self.membership.errors + self._nodes.errors + self._copies.errors
                + self.registry.errors)

    # -- this node's copies -----------------------------------------------------------

    async def _rejoined(self, event: Rejoin) -> None:
        # Whatever hung on the old lease is gone: write every copy again.
        self._written.clear()

    def _current(self) -> tuple[dict[tuple[str, str], CopyState], dict[str, Any]]:
        """This node's copies by (model, version), and the node record's fields."""
        assert self._service is not None
        service = self._service
        copies: dict[tuple[str, str], CopyState] = {}
        cannot: dict[str, str] = {}
        prepared: dict[str, list[str]] = {}
        now_mono, now_wall = time.monotonic(), time.time()
        for dep in list(service.deployments.by_name.values()):
            if dep.removed:
                continue
            why = missing_local_source(dep.doc)
            if why is not None:
                cannot[dep.name] = why
            for v in list(dep.versions.values()):
                if v.resolved is not None and not v.removed:  # its files are in the store
                    prepared.setdefault(v.model, []).append(v.label)
                held = [c for c in v.copies if c.state in (LOADING, READY, UNLOADING)]
                if not held:
                    continue
                states = {c.state for c in held}
                state = ("ready" if READY in states else "loading" if LOADING in states
                         else "draining")
                last = max(c.last_used for c in held)
                copies[(v.model, v.label)] = CopyState(
                    model=v.model, version=v.label, state=state,
                    bytes=sum(c.size for c in held),
                    last_used=round(now_wall - (now_mono - last), 1) if last else 0.0,
                    rate=round(v.rate, 2))
        memory = service.pool.memory()
        record = {"capacity_bytes": memory["budget_bytes"],
                  "memory_used_bytes": memory["held_bytes"],
                  "copies": sorted(copies.values(), key=lambda c: (c.model, c.version or "")),
                  "draining": bool(service.draining or getattr(  # placer.drain (part B)
                      getattr(service, "placer", None), "draining", False)),
                  "cannot_load": cannot,
                  "prepared": {m: sorted(labels) for m, labels in sorted(prepared.items())}}
        return copies, record

    async def _sync_copies(self) -> None:
        record_was: dict[str, Any] = {}
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                copies, record = self._current()
            except Exception:  # the service's state mid-change: next time
                log.debug("reading this node's copies failed", exc_info=True)
                continue
            if _comparable(record) != _comparable(record_was):
                self.membership.update(**record)
                record_was = record
            lease = self.membership.lease
            if not lease or self.degraded:
                continue
            try:
                await self._write_copies(copies, lease)
            except ClusterError as exc:
                log.info("writing this node's copies: %s", exc)

    async def _write_copies(self, copies: dict[tuple[str, str], CopyState], lease: int) -> None:
        for key in [k for k in self._written if k not in copies]:
            await self.kv.delete(self.keys.copy(key[0], key[1], self.name))
            del self._written[key]
        for key, state in copies.items():
            was = self._written.get(key)
            if was is not None and _same_copy(was, state):
                continue
            await self.kv.put(self.keys.copy(key[0], key[1], self.name), state.to_bytes(),
                              lease=lease)
            self._written[key] = state


def missing_local_source(doc: ModelDoc) -> str | None:
    """Why a node cannot load ``doc`` from here: a local source (``file://`` or a path)
    that does not exist on this node. None when every local source exists."""
    for label, spec in doc.versions.items():
        if scheme_of(spec.source) != "file":
            continue
        raw = spec.source
        if raw.startswith("file:"):
            raw = unquote(urlparse(raw).path)
        path = os.path.abspath(os.path.expanduser(raw))
        if not os.path.exists(path):
            return f"version {label}: local source {path} does not exist on this node"
    return None


def _same_copy(a: CopyState, b: CopyState) -> bool:
    """Equal but for last use and rate (they change with every request: the node record
    carries them, at its own pace)."""
    return (a.state, a.bytes) == (b.state, b.bytes)


def _comparable(record: dict[str, Any]) -> Any:
    if not record:
        return None
    return (record["capacity_bytes"], record["memory_used_bytes"] // (1 << 20),
            [(c.model, c.version, c.state, c.bytes, round(c.rate)) for c in record["copies"]],
            record["draining"], sorted(record["cannot_load"].items()),
            list(record["prepared"].items()))


async def preflight(settings: Settings) -> None:
    """What ``cachemesh serve --cluster`` checks before it starts anything, so that a
    refusal is one line: the token, etcd reachable, this node's name not held by another
    live node (the join itself checks again: membership.py)."""
    from ...cluster.identity import node_id
    from ...errors import NodeNameTakenError

    cluster = settings.cluster
    cluster.check()
    name = cluster.name_or_host()
    cluster.advertise_url(settings.serve)
    kv = EtcdKV.from_settings(cluster, timeout=3.0)
    try:
        found = await kv.get(Keys(cluster.prefix).node(name))
    finally:
        await kv.close()
    if found is None:
        return
    try:
        other = NodeRecord.from_bytes(found.value)
    except ValueError:
        return
    if other.node_id != node_id(settings.home):
        raise NodeNameTakenError(
            f"node name {name!r} is taken by a live node at {other.advertise} with another"
            " store; choose another --node-name, or stop that node")
