"""Copies across nodes: the leader keeps ``min_copies`` and adds copies of hot models.

``copies.py`` scales a version over the workers of one node; this scales it over the
nodes, and only the leader (``cluster.election.is_leader``) does it, so that two nodes
never add the same copy. Every :data:`INTERVAL_S` the leader looks at each version
that takes traffic, from the copies watch (``ClusterContext.copies_of``), and wants:

- at least ``scaling.min_copies`` copies (one per node), whatever the rate;
- one more than it has while the copies' summed rate (``CopyState.rate`` in the node
  records) is above
  ``copy_rate`` per copy, up to ``max_copies`` (``CopyPolicy``: the document's
  scaling, else the server's settings); a node record with no rate adds nothing.

It adds one copy per version per round, on the best node that holds none
(``node_choice.rank_for_load``), through the same call a placement uses
(``ClusterPlacer._load_on``), and waits for it before the next. Fewer copies are not
made here: each node lets its idle copies go by its own LRU, except that a copy the
leader placed for ``min_copies`` counts as wanted (the same decision, taken again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ...errors import CachemeshError
from .node_choice import rank_for_load

if TYPE_CHECKING:
    from ..core.state import Deployment
    from .placer import ClusterPlacer

log = logging.getLogger("cachemesh.cluster")

INTERVAL_S = 1.0


def wanted(policy_rate: float, max_copies: int, min_copies: int, copies: int,
           rate: float) -> int:
    """Copies a version should have across the cluster (pure)."""
    want = min_copies
    if policy_rate > 0 and copies and rate > copies * policy_rate:
        want = max(want, copies + 1)
    if max_copies:
        want = min(want, max(max_copies, min_copies))
    return want


class ClusterScaler:
    """The leader's loop (see the module docstring)."""

    def __init__(self, placer: ClusterPlacer) -> None:
        self.placer = placer
        self.last: dict[str, str] = {}  # model@version -> the last thing done or refused

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            try:
                if self.placer.cluster.election.is_leader and not self.placer.draining:
                    await self.round()
            except CachemeshError as exc:
                log.info("cluster copy scaling: %s", exc)
            except Exception:
                log.exception("cluster copy scaling failed")

    async def round(self) -> None:
        service = self.placer.service
        deps: list[Deployment] = [d for d in service.deployments.by_name.values()
                                  if not d.removed]
        await asyncio.gather(*(self.scale(d, label) for d in deps
                               for label in d.doc.serving()))

    async def scale(self, dep: Deployment, label: str) -> None:
        placer = self.placer
        scaling = dep.doc.scaling
        policy = dep.policy
        ready = placer.copies(dep.name, label, "ready")
        loading = placer.copies(dep.name, label, "loading")
        if placer.here(dep.name, label):
            ready = [*ready, placer.name]
        # Rates from the node records (rewritten every few seconds while they change;
        # the copy records change with a copy's state only).
        records = await placer.records()
        rate = sum(c.rate for r in records.values() for c in r.copies
                   if c.model == dep.name and (c.version or "default") == label
                   and c.state == "ready")
        want = wanted(policy.copy_rate, policy.max_copies if scaling.max_copies else 0,
                      scaling.min_copies or 0, len(ready), rate)
        if len(ready) + len(loading) >= want:
            return
        records = await placer.records(fresh=True)
        excluded = {*ready, *loading}
        ranked = rank_for_load(records.values(), placer.name, model=dep.name,
                               version=label, excluded=excluded)
        if not ranked:
            self.last[f"{dep.name}@{label}"] = f"wants {want} copies, no other node can take one"
            return
        node = ranked[0]
        deadline = time.monotonic() + service_timeout(placer)
        try:
            await placer._load_on(node, dep.name, label, deadline)
            self.last[f"{dep.name}@{label}"] = f"copy {len(ready) + 1} of {want} on {node}"
            log.info("cluster copies: %s@%s on %s (%d of %d)", dep.name, label, node,
                     len(ready) + 1, want)
        except Exception as exc:  # noqa: BLE001 - a node's failure is one round's note
            self.last[f"{dep.name}@{label}"] = f"copy on {node} failed: {exc}"
            log.warning("cluster copies: %s@%s on %s failed: %s", dep.name, label, node, exc)
        with contextlib.suppress(Exception):
            await placer.records(fresh=True)


def service_timeout(placer: ClusterPlacer) -> float:
    return float(placer.service.cfg.request_timeout_s)
