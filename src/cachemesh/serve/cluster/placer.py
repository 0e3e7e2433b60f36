"""Cluster-wide placement: which node answers a request, and the one load of a copy
that is loaded nowhere.

:meth:`ClusterPlacer.locate` answers "which node serves model ``m`` version ``v`` now",
for the forwarders (``forward.py``, ``forward_grpc.py``) and for the drain:

1. a ready copy here, or one loading here: this node (no hop);
2. ready copies elsewhere: the one with fewest requests in flight from here
   (``node_choice.pick_copy``; a draining node's copy only if there is no other);
3. a copy loading elsewhere: wait (on the copies watch) until it is ready;
4. loaded nowhere: **one load in the whole cluster**. The node takes the claim
   ``placing/{m}/{v}`` (``cluster/keys.py``), create-if-absent and bound to its lease,
   so that a claimer that dies lets go. The claimer ranks the nodes
   (``node_choice.rank_for_load``) and makes the best one load the copy: itself
   (``Loader.ensure_loaded``, as on one node) or another (``POST /api/v1/cluster/load``,
   ``cluster_routes.py``, with the cluster token). A failed load is tried on the next
   node, up to :data:`MAX_LOAD_NODES` nodes; each failure is written into the claim
   (``tried``) so that the others, and the status, see why. The claim ends ``ready``
   (with the node) or ``failed`` (with the reasons); it is deleted once the copy
   record says ready, or :data:`FAILED_CLAIM_S` after a failure.
   Every other node (and every other request here: one flight per copy and node)
   follows the claim with a watch and the copies watch, and goes where it says.

``exclude`` names nodes a request must not go to: those that refused its connection
(the retry rule, ``forward.py``) and, during a drain, this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from ...errors import (
    CachemeshError,
    ClusterError,
    ClusterUnavailableError,
    ModelLoadError,
    NodeUnreachableError,
    RequestTimeoutError,
    RevisionConflictError,
    UnavailableError,
)
from ..core.loadqueue import REQUEST
from .node_choice import pick_copy, rank_for_load

if TYPE_CHECKING:
    from ...cluster.records import NodeRecord
    from ..core.service import ModelService

log = logging.getLogger("cachemesh.cluster")

MAX_LOAD_NODES = 3  # a copy that fails to load on this many nodes fails the request
FAILED_CLAIM_S = 5.0  # a failed claim stays this long: its waiters read the reasons
READY_CLAIM_S = 10.0  # a ready claim goes once the copy record says ready, at most this late
RECORDS_MAX_AGE_S = 1.0  # node records are read again after this long
WAIT_STEP_S = 0.05  # how often a waiter looks at the in-memory copies
GRAIN_BYTES = 64 << 20  # free memory closer than this (or one copy) ranks alike

FORWARDED_BY = "cachemesh-forwarded-by"  # the hop header: the node that forwarded it
TOKEN_HEADER = "cachemesh-cluster-token"  # node-to-node calls; never sent to or from outside
NODE_HEADER = "cachemesh-node"  # the node that answered
VERSION_HEADER = "cachemesh-model-version"  # the version that answered
REFUSED_HEADER = "cachemesh-refused"  # a forwarded request not run (draining): send it elsewhere


def placer_of(service: ModelService) -> ClusterPlacer | None:
    """The service's placer in cluster mode (made on first use), else None."""
    cluster = getattr(service, "cluster", None)
    if cluster is None:
        return None
    placer: ClusterPlacer | None = getattr(service, "placer", None)
    if placer is None or placer.cluster is not cluster:
        placer = ClusterPlacer(service, cluster)
        service.placer = placer  # type: ignore[attr-defined]
    return placer


def node_tls(cluster: Any) -> Any:
    """How node-to-node HTTPS checks the other node (the cluster's CA, if it has one)."""
    ssl_of = getattr(cluster, "client_ssl", None)
    return ssl_of() if ssl_of is not None else True


class ClusterPlacer:
    """Where requests go in a cluster (see the module docstring). One per node."""

    def __init__(self, service: ModelService, cluster: Any) -> None:
        self.service = service
        self.cluster = cluster
        self.name: str = cluster.name
        self.inflight: dict[str, int] = {}  # forwarded requests in flight, per node
        self.picked: dict[str, int] = {}
        self._tick = 0
        self._records: dict[str, NodeRecord] = {}
        self._records_at = 0.0
        self._flights: dict[tuple[str, str, frozenset[str]], asyncio.Task[str]] = {}
        self.last_failure: dict[str, str] = {}  # model@version -> why its placement failed
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0),
                                      verify=node_tls(cluster), trust_env=False)
        self.draining = False

    def start(self) -> None:
        """Start the leader's copy scaler (``cluster_copies.py``) with the service."""
        from .cluster_copies import ClusterScaler

        self.scaler = ClusterScaler(self)
        self.service.background.start(self.scaler.run())

    async def close(self) -> None:
        await self.http.aclose()

    # -- what the cluster holds --------------------------------------------------------

    async def records(self, *, fresh: bool = False) -> dict[str, NodeRecord]:
        """The live nodes' records by name, read at most once per RECORDS_MAX_AGE_S."""
        if fresh or time.monotonic() - self._records_at > RECORDS_MAX_AGE_S:
            found = await self.cluster.nodes()
            self._records = {r.name: r for r in found}
            self._records_at = time.monotonic()
        return self._records

    async def record(self, node: str) -> NodeRecord:
        records = await self.records()
        if node not in records:
            records = await self.records(fresh=True)
        if node not in records:
            raise NodeUnreachableError(f"node {node!r} left the cluster", node)
        return records[node]

    def copies(self, model: str, label: str, state: str) -> list[str]:
        """Nodes other than this one whose copy of ``model@label`` is in ``state``."""
        return [node for node, version, copy in self.cluster.copies_of(model)
                if node != self.name and (version or "default") == label
                and copy.state == state]

    def here(self, model: str, label: str) -> bool:
        """A copy ready or on its way in on this node."""
        try:
            v = self.service.deployments.get(model).versions[label]
        except (CachemeshError, KeyError):
            return False
        return bool(v.ready_copies()) or v.load_task is not None or v.copy_task is not None

    def has_files(self, model: str, label: str) -> bool:
        """This node has prepared ``model@label`` (its files are in the store)."""
        try:
            v = self.service.deployments.get(model).versions[label]
        except (CachemeshError, KeyError):
            return False
        return v.resolved is not None

    def _pick(self, nodes: list[str]) -> str | None:
        draining = {n for n, r in self._records.items() if r.draining}
        chosen = pick_copy([n for n in nodes if n not in draining] or nodes,
                           self.inflight, self.picked)
        if chosen is not None:
            self._tick += 1
            self.picked[chosen] = self._tick
        return chosen

    # -- the decision ----------------------------------------------------------------

    async def locate(self, model: str, label: str, *, deadline: float,
                     exclude: frozenset[str] = frozenset()) -> str:
        """The node that serves ``model@label`` now (this node's name for here)."""
        if self.draining:
            exclude = exclude | {self.name}
        while True:
            if self.name not in exclude and self.here(model, label):
                return self.name
            await self.records()
            ready = [n for n in self.copies(model, label, "ready") if n not in exclude]
            if ready:
                chosen = self._pick(ready)
                assert chosen is not None
                return chosen
            loading = [n for n in self.copies(model, label, "loading") if n not in exclude]
            if not loading:
                key = (model, label, exclude)
                flight = self._flights.get(key)
                if flight is None:
                    flight = self.service.background.start(
                        self._place(model, label, exclude, deadline))
                    self._flights[key] = flight
                    flight.add_done_callback(lambda _: self._flights.pop(key, None))
                node = await asyncio.shield(flight)
                if node:
                    return node
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeoutError(f"no node could serve model {model!r} in time")
            await asyncio.sleep(min(WAIT_STEP_S, remaining))

    async def _place(self, model: str, label: str, exclude: frozenset[str],
                     deadline: float) -> str:
        """The node that loaded the copy ("" when the claim went away: look again)."""
        kv, key = self.cluster.kv, self.cluster.keys.placing(model, label)
        claim = {"by": self.name, "state": "placing", "node": None, "tried": []}
        try:
            revision = await kv.put_if(key, orjson.dumps(claim), mod_revision=0,
                                       lease=self.cluster.membership.lease)
        except RevisionConflictError:
            log.info("%s@%s: following another node's placement", model, label)
            return await self._follow(model, label, key, exclude, deadline)
        except ClusterUnavailableError:
            # etcd down: no claim can be taken; degrade to one node's rule, load it here.
            if self.name in exclude or self.cluster.can_load_here(model) is not None:
                raise
            await self._load_on(self.name, model, label, deadline)
            return self.name
        log.info("%s@%s: placing it (claim taken)", model, label)
        written = [revision]  # the claim's revision, as each write moves it
        try:
            node = await self._load_somewhere(model, label, exclude, deadline, claim, key,
                                               written)
        except BaseException as exc:
            claim.update(state="failed", reason=str(exc))
            self.last_failure[f"{model}@{label}"] = str(exc)
            await self._write_then_delete(key, claim, written[0], FAILED_CLAIM_S, None)
            raise
        log.info("placed %s@%s on %s", model, label, node)
        claim.update(state="ready", node=node)
        await self._write_then_delete(key, claim, written[0], READY_CLAIM_S,
                                      (model, label, node))
        return node

    async def _load_somewhere(self, model: str, label: str, exclude: frozenset[str],
                              deadline: float, claim: dict[str, Any], key: str,
                              written: list[int]) -> str:
        records = await self.records(fresh=True)
        banned = set(exclude)
        if self.cluster.can_load_here(model) is not None:
            banned.add(self.name)
        # Files on disk: a node pulls a version only when it is to load it (Deployments),
        # and its record's ``prepared`` says which it holds; a node that has them loads
        # without a pull. Ties fall to memory, then LRU, then this node.
        ranked = rank_for_load(records.values(), self.name, model=model, version=label,
                               excluded=banned, grain=self._grain(model, label)
                               )[:MAX_LOAD_NODES]
        if not ranked:
            raise UnavailableError(f"no node may load model {model!r} version {label!r}"
                                   f" (excluded: {', '.join(sorted(banned)) or 'none'})")
        reasons: list[str] = []
        for node in ranked:
            try:
                await self._load_on(node, model, label, deadline)
                return node
            except (CachemeshError, httpx.HTTPError) as exc:
                if isinstance(exc, RequestTimeoutError):
                    raise
                reasons.append(f"{node}: {exc}")
                claim["tried"] = reasons
                self._note(model, label, f"load on node {node} failed: {exc}")
                log.warning("loading %s@%s on %s failed: %s", model, label, node, exc)
                with contextlib.suppress(ClusterError):
                    written[0] = await self.cluster.kv.put_if(
                        key, orjson.dumps(claim), mod_revision=written[0],
                        lease=self.cluster.membership.lease)
        raise ModelLoadError(f"model {model!r} version {label!r} could not be loaded on"
                             f" {len(reasons)} node(s): " + " | ".join(reasons))

    def _note(self, model: str, label: str, message: str) -> None:
        """Into the version's status (``errors``), where an operator looks."""
        with contextlib.suppress(CachemeshError, KeyError):
            self.service.deployments.get(model).versions[label].error(message)

    def _grain(self, model: str, label: str) -> int:
        """The version's predicted size, at least 64 MiB (a worker's RSS moves by that much
        on its own): free memory is compared in these steps (node_choice.rank_for_load)."""
        try:
            v = self.service.deployments.get(model).versions[label]
        except (CachemeshError, KeyError):
            return GRAIN_BYTES
        return max(v.predicted, v.size(), GRAIN_BYTES)

    async def _load_on(self, node: str, model: str, label: str, deadline: float) -> None:
        if node == self.name:
            v = self.service.deployments.get(model).versions[label]
            await self.service.loader.ensure_loaded(v, REQUEST, deadline)
            return
        self.service.metrics.remote_loads.inc()
        record = await self.record(node)
        timeout = max(0.1, deadline - time.monotonic())
        try:
            reply = await self.http.post(
                f"{record.advertise}/api/v1/cluster/load",
                json={"model": model, "version": label},
                headers={TOKEN_HEADER: self.cluster.token, FORWARDED_BY: self.name},
                timeout=httpx.Timeout(timeout, connect=2.0))
        except httpx.ConnectError as exc:
            raise NodeUnreachableError(f"node {node!r} refused the load: {exc}", node) from exc
        if reply.status_code != 200:
            try:
                why = reply.json().get("error") or reply.text
            except ValueError:
                why = reply.text
            raise ModelLoadError(f"HTTP {reply.status_code}: {why}"[:500])

    async def _follow(self, model: str, label: str, key: str, exclude: frozenset[str],
                      deadline: float) -> str:
        """Wait on another node's claim: its node once ready, its reasons if it failed,
        "" if it went away (the caller looks again, and may claim)."""
        kv = self.cluster.kv
        found = await kv.get(key)
        if found is None:
            return ""
        latest: dict[str, Any] = {"claim": orjson.loads(found.value),
                                  "revision": found.mod_revision}
        changed = asyncio.Event()

        async def follow() -> None:
            async with contextlib.aclosing(
                    kv.watch(key, start_revision=found.mod_revision + 1)) as events:
                async for event in events:
                    latest["claim"] = (orjson.loads(event.kv.value) if event.kind == "put"
                                       else None)
                    latest["revision"] = event.kv.mod_revision
                    changed.set()

        watcher = asyncio.ensure_future(follow())
        try:
            while True:
                ready = [n for n in self.copies(model, label, "ready") if n not in exclude]
                if ready or (self.name not in exclude and self.here(model, label)):
                    return ""  # locate picks it
                claim = latest["claim"]
                if claim is None or watcher.done():
                    return ""
                if claim.get("state") == "ready":
                    if claim.get("node") not in exclude:
                        return str(claim["node"])
                    # A placement that is over, on a node this request may not use (it
                    # drains, or refused the connection): end it, and place again.
                    with contextlib.suppress(ClusterError):
                        await kv.delete(key, mod_revision=latest["revision"])
                    return ""
                if claim.get("state") == "failed":
                    raise ModelLoadError(claim.get("reason") or "the load failed elsewhere")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeoutError(
                        f"model {model!r} version {label!r}: the load by node"
                        f" {claim.get('by')!r} did not end in time")
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(WAIT_STEP_S * 2, remaining))
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher

    async def _write_then_delete(self, key: str, claim: dict[str, Any], revision: int,
                                 keep_s: float, ready: tuple[str, str, str] | None) -> None:
        """Put the claim's outcome (on the revision this node last wrote), then delete it
        in the background: at once when the copy record says ready (``ready``), else after
        ``keep_s``."""
        kv = self.cluster.kv
        try:
            revision = await kv.put_if(key, orjson.dumps(claim), mod_revision=revision,
                                       lease=self.cluster.membership.lease)
        except ClusterError as exc:  # the lease bounds the claim's life anyway
            log.warning("could not write the outcome of %s: %s", key, exc)
            return

        async def later() -> None:
            until = time.monotonic() + keep_s
            while time.monotonic() < until:
                if ready is not None and any(
                        node == ready[2] and (version or "default") == ready[1]
                        and copy.state == "ready"
                        for node, version, copy in self.cluster.copies_of(ready[0])):
                    break
                await asyncio.sleep(0.1)
            with contextlib.suppress(ClusterError):
                await kv.delete(key, mod_revision=revision)

        self.service.background.start(later())

    # -- forwarding bookkeeping ------------------------------------------------------

    def started(self, node: str) -> None:
        self.inflight[node] = self.inflight.get(node, 0) + 1

    def finished(self, node: str) -> None:
        self.inflight[node] = self.inflight.get(node, 1) - 1

    async def with_retries(self, model: str, label: str,
                           send: Callable[[str], Awaitable[Any]]) -> Any:
        """Locate a node and ``send(node)``; a node that never took the request
        (NodeUnreachableError) is excluded and the next one tried: the one retry rule.
        ``send`` is called with this node's name when the request is served here."""
        deadline = time.monotonic() + self.service.cfg.request_timeout_s
        exclude: frozenset[str] = frozenset()
        while True:
            node = await self.locate(model, label, deadline=deadline, exclude=exclude)
            if node == self.name:
                return await send(node)
            self.started(node)
            try:
                return await send(node)
            except NodeUnreachableError:
                self.service.metrics.forwards.labels("unreachable").inc()
                exclude = exclude | {node}
                self._records_at = 0.0  # it may have left: read the records again
            finally:
                self.finished(node)

    # -- drain -----------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> list[str]:
        """SIGTERM in a cluster: take no new placements (the record says draining, and
        ``locate`` leaves this node out), and load this node's hot versions elsewhere
        before it goes. Bounded by ``timeout_s``; returns the versions moved."""
        self.draining = True
        self.cluster.membership.update(draining=True)
        try:
            return await asyncio.wait_for(
                self.move_hot_models(time.monotonic() + timeout_s), timeout_s)
        except TimeoutError:
            log.warning("drain: moving hot models took longer than %.0f s", timeout_s)
            return []

    async def move_hot_models(self, deadline: float) -> list[str]:
        """Before this node leaves: a copy elsewhere of every version it holds that took
        a request in the last minute (the loads run on other nodes, one claim each).
        Returns the versions that have one."""
        now = time.monotonic()
        hot = [v for v in self.service.deployments.versions()
               if v.ready_copies() and now - v.last_used < 60.0]
        hot.sort(key=lambda v: -v.uses)

        async def move(v: Any) -> str | None:
            try:
                await self.locate(v.model, v.label, deadline=deadline,
                                  exclude=frozenset({self.name}))
                return v.id
            except CachemeshError as exc:
                log.warning("drain: no other node took %s: %s", v.display, exc)
                return None

        moved = await asyncio.gather(*(move(v) for v in hot))
        return [m for m in moved if m]
