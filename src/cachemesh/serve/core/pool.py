"""The worker processes of this node: spawn, death, recycle, replace; their memory.

The pool keeps ``--workers`` processes (``workers.py``) running. Each is a
:class:`~.slot.Slot`. They share one memory budget (``--memory``), and the pool
is where that memory is counted: :meth:`WorkerPool.states` is the snapshot that
placement decides over (``placement.py``), :meth:`WorkerPool.memory` what status
shows.

- A worker that dies is reported to ``on_lost`` (``Loader.slot_lost``: what its
  copies become is decided there, once for every kind of slot) and replaced.
- A worker that holds no model yet much more memory than its own (a runtime
  leaked, or the allocator kept what unloads freed) is restarted when a load
  waits for that room (:meth:`bloated`, :meth:`recycle`): nothing else can free it.
- Whoever waits for room waits on :meth:`changed`, woken by :meth:`notify` when
  a request ends, a load or unload finishes or a worker dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...config import format_size
from ...errors import CachemeshError
from ..workers.workers import Launched, WorkerHandle, worker_environ
from .memory import default_budget
from .placement import Resident, SlotState, held
from .shared import Shared
from .slot import Slot
from .state import LOADING, READY, UNLOADED, Copy, Version

log = logging.getLogger("cachemesh.serve")

# How long a wait for room sleeps at most without news (the churn guard's clock runs).
CAPACITY_POLL_S = 0.05
# A worker that holds no model but this much more than its own memory, when a load
# waits for room that recycling it would make, is restarted (see bloated).
RECYCLE_MIN_BYTES = 8 * 1024 * 1024
# Recent uses of a version halve every this many seconds (placement's churn guard).
USES_HALF_LIFE_S = 30.0


class WorkerPool:
    """The worker processes and the memory budget they share."""

    def __init__(self, shared: Shared, versions: Callable[[], list[Version]],
                 launched: Sequence[Launched] = ()) -> None:
        """``versions``: every version the service holds (their copies are on the
        workers). ``launched``: processes started ahead, adopted before any other."""
        self.shared = shared
        self.cfg = shared.cfg
        self.versions = versions
        self.budget = self.cfg.memory or default_budget()
        shared.metrics.budget.set(self.budget)
        self.workers: list[WorkerHandle] = []
        self.stopping = False
        # Told when a worker died (set by the loader): the slot and how it ended.
        self.on_lost: Callable[[Slot, str], None] = lambda slot, reason: None
        self._next_id = 0
        self._launched = list(launched)
        self._capacity = asyncio.Event()
        self._capacity_waiters = 0

    async def start(self) -> None:
        n = self.cfg.worker_count()
        self.workers = list(await asyncio.gather(*(self._spawn() for _ in range(n))))

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        for left in self._launched:  # never adopted: the worker exits on EOF
            left.sock.close()
        self._launched = []

    def alive(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.alive]

    def slot(self, sid: int) -> WorkerHandle:
        return next(w for w in self.workers if w.id == sid)

    # -- life and death ----------------------------------------------------------------

    async def _spawn(self) -> WorkerHandle:
        self._next_id += 1
        worker = WorkerHandle(self._next_id, self._died)
        await worker.start(memory_limit=self.cfg.worker_memory_limit,
                           threads=self.cfg.worker_threads,
                           environ=worker_environ(self.shared.settings),
                           launched=self._launched.pop(0) if self._launched else None)
        return worker

    def _died(self, worker: WorkerHandle) -> None:
        log.warning("%s", worker.exit_reason)
        self.on_lost(worker, worker.exit_reason)
        if not self.stopping:
            self.shared.metrics.restarts.inc()
            self.shared.background.start(self._replace(worker))
        self.notify()

    def bloated(self, short: int) -> WorkerHandle | None:
        """A worker that holds no model and is idle, yet holds at least ``short`` bytes
        more than its own memory: what a runtime leaked, or what the allocator did not
        give back after unloads. Nothing can evict that; restarting the worker frees it."""
        versions = self.versions()
        taken = {c.slot.id for v in versions for c in v.copies}
        ahead = {v.prefetched_on for v in versions if not v.loads}
        for w in self.workers:
            idle = w.alive and not w.busy and w.id not in taken and w.id not in ahead
            if idle and w.rss() - w.base_rss >= max(short, RECYCLE_MIN_BYTES):
                return w
        return None

    async def recycle(self, worker: WorkerHandle, short: int) -> None:
        extra = worker.rss() - worker.base_rss
        log.warning("restarting worker %d: it holds no model but %s more than its own"
                    " memory, and a load needs %s more room", worker.id,
                    format_size(extra), format_size(max(short, 0)))
        self.shared.metrics.recycles.inc()
        await worker.stop()  # not a death: no copies to forget, and we replace it here
        await self._replace(worker)

    async def _replace(self, dead: WorkerHandle) -> None:
        for attempt in range(5):
            try:
                fresh = await self._spawn()
            except CachemeshError as exc:
                log.error("could not replace %s: %s", dead, exc)
                await asyncio.sleep(min(2**attempt, 10))
                continue
            self.workers = [fresh if w is dead else w for w in self.workers]
            self.notify()
            return

    # -- memory --------------------------------------------------------------------------

    def states(self) -> list[SlotState]:
        """The workers as the placement policy sees them, now."""
        now = time.monotonic()
        alive_bases = sum(w.base_rss for w in self.workers if w.alive)
        on: dict[int, list[Copy]] = {w.id: [] for w in self.workers}
        for v in self.versions():
            for c in v.copies:
                if c.slot.id in on and c.slot.alive:
                    on[c.slot.id].append(c)
        states = []
        for w in self.workers:
            residents, sizes, reserved = [], 0, 0
            for c in on[w.id]:
                v = c.version
                loading = c.state != READY
                size = c.size or v.predicted
                if c.state == LOADING:
                    reserved += v.predicted
                else:
                    sizes += size
                claimed = c.inflight + (v.waiting if c.state == READY else 0)
                residents.append(Resident(
                    c.key, v.id, size, claimed, c.last_used, c.loaded_at, loading,
                    v.uses * 0.5 ** ((now - v.last_used) / USES_HALF_LIFE_S)))
            rss = w.rss()
            states.append(SlotState(
                w.id, w.alive, capacity=self.budget - (alive_bases - w.base_rss),
                used=held(w.base_rss, rss, sizes, reserved) if w.alive else 0, base=w.base_rss,
                residents=tuple(residents), load=sum(c.inflight for c in on[w.id])))
        return states

    def memory(self) -> dict[str, Any]:
        """The budget, what the workers hold of it, and the copies on each."""
        held_by = {s.id: s for s in self.states()}
        versions = self.versions()
        workers = []
        for w in self.workers:
            s = held_by[w.id]
            names = [c.version.display for v in versions for c in v.copies
                     if c.slot is w and c.state != UNLOADED]
            workers.append({"id": w.id, "pid": w.pid, "alive": w.alive, "rss_bytes": w.rss(),
                            "base_bytes": w.base_rss, "held_bytes": s.used, "inflight": s.load,
                            "models": sorted(names)})
        total = sum(x["held_bytes"] for x in workers if x["alive"])
        return {"budget_bytes": self.budget, "held_bytes": total, "workers": workers}

    # -- waiting for room -------------------------------------------------------------------

    def notify(self) -> None:
        """Room may have changed: wake whoever waits in :meth:`changed`."""
        if self._capacity_waiters:
            event, self._capacity = self._capacity, asyncio.Event()
            event.set()

    async def changed(self, timeout: float = CAPACITY_POLL_S) -> None:
        """Wait until :meth:`notify`, or ``timeout`` (at most CAPACITY_POLL_S) passes."""
        self._capacity_waiters += 1
        try:
            await asyncio.wait_for(self._capacity.wait(), min(timeout, CAPACITY_POLL_S))
        except TimeoutError:
            pass
        finally:
            self._capacity_waiters -= 1
