"""The life of a copy: a version prepared, a copy loaded on a slot and adopted, unloaded.

- Prepare (``prepare.py``): each version's source is pulled through the cache
  once, in the background, and its runtime decided; a load waits for that (and, in
  cluster mode, where a node pulls only what it is to load, starts it).
- Load: one on-demand load per version at a time (a single shared task that every
  request waiting on it awaits, :meth:`Loader.ensure_loaded`), through the load
  queue (bounded, ``load_concurrency`` at once, request-driven loads first). The
  placement function (``placement.py``, over the pool's snapshot) picks a slot and
  the idle copies to evict; a load whose slot raised, crashed or ran out of memory
  is tried again on another slot. While any copy is loaded the version's cache is
  held open (``Caches.open``) so the store's gc and eviction leave its files alone.
- Adopt: the slot's answer (:class:`~.messages.Loaded`) gives the copy its size
  and the version its metadata and capabilities, and the worker its own memory.
- Unload: one unload task per copy; requests in flight on it finish first.
- A slot lost (:meth:`Loader.slot_lost`): the one rule, for a worker that died
  and, in cluster mode, a node that did.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Mapping

from ...errors import (
    CachemeshError,
    ConflictError,
    ModelFailedError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    RequestTimeoutError,
    UnavailableError,
    WorkerCrashedError,
)
from ..workers.messages import IntegrityCheck, Load, Loaded, Unload
from .copies import pick
from .loadqueue import BACKGROUND, LoadQueue
from .placement import Placement, place
from .pool import WorkerPool
from .prepare import Preparer
from .shared import Shared
from .slot import Slot
from .state import (
    FAILED,
    LOADING,
    READY,
    UNLOADED,
    UNLOADING,
    Copy,
    Deployment,
    Version,
    versions_of,
)

log = logging.getLogger("cachemesh.serve")


class LoadFailed(Exception):
    """A load that failed on one slot (it may be tried on another)."""

    def __init__(self, slot: int, error: CachemeshError) -> None:
        super().__init__(str(error))
        self.slot, self.error = slot, error


class Loader:
    """Loads and unloads the copies of every version on the pool's slots."""

    def __init__(self, shared: Shared, pool: WorkerPool,
                 models: Mapping[str, Deployment]) -> None:
        """``models``: the service's deployments by name (read, never changed here)."""
        self.shared = shared
        self.cfg = shared.cfg
        self.caches = shared.caches
        self.pool = pool
        self.models = models
        self.queue = LoadQueue(self.cfg.load_concurrency, self.cfg.load_queue)
        self._keys = itertools.count(1)
        # A version's files and runtime (prepare.py); a load waits for them.
        preparer = Preparer(shared, pool, models)
        self.prepare = preparer.prepare
        self.prepare_if_present = preparer.prepare_if_present
        pool.on_lost = self.slot_lost

    def versions(self) -> list[Version]:
        return versions_of(self.models)

    async def load_quietly(self, v: Version) -> None:
        try:
            await self.ensure_loaded(v, BACKGROUND, deadline=None)
        except CachemeshError as exc:
            log.warning("eager load of %s failed: %s", v.display, exc)

    @staticmethod
    def ready_copy(v: Version) -> Copy | None:
        ready = [c for c in v.copies if c.state == READY and c.slot.alive]
        return pick(ready) if ready else None

    async def ensure_loaded(self, v: Version, priority: int, deadline: float | None) -> Copy:
        """A ready copy of ``v``, loading one if there is none. It is returned in the
        same step it was found ready in: the caller counts its request on it before
        anything else runs, so no eviction can pick it in between."""
        while True:
            copy = self.ready_copy(v)
            if copy is not None:
                return copy
            if v.removed and not v.inflight:
                # (A request routed to it before it was dropped counts in inflight: it
                # may still load it; Deployments.retire waits for it.)
                raise ModelNotFoundError(v.model, v.label)
            if v.phase == FAILED and time.monotonic() < v.failed_until:
                raise ModelFailedError(
                    f"model {v.display!r} is marked failed: {v.reason}",
                    retry_after=v.failed_until - time.monotonic())
            if v.load_task is None:
                # A copy on its way in or out settles first: then load only if none is left.
                unloading = [c.unload_task for c in v.copies if c.unload_task is not None]
                if unloading:
                    await asyncio.shield(unloading[0])
                    continue
                if v.copy_task is not None:
                    with contextlib.suppress(CachemeshError):
                        await asyncio.shield(v.copy_task)
                    continue
            if v.load_task is None:
                v.load_task = self.shared.background.start(self._load(v, priority, deadline))
            else:
                self.queue.promote(v.ticket[0], priority)
            await asyncio.shield(v.load_task)

    async def _load(self, v: Version, priority: int, deadline: float | None) -> None:
        started = time.monotonic()
        try:
            if v.prepare_task is not None and not v.prepare_task.done():
                await asyncio.shield(v.prepare_task)
            if v.resolved is None:  # not pulled here yet (cluster mode), or it failed
                v.prepare_task = self.shared.background.start(self.prepare(v))
                await asyncio.shield(v.prepare_task)
            v.phase, v.reason = LOADING, None
            queued = time.monotonic()
            async with self.queue.slot(priority, v.ticket):
                v.ticket[0] = None
                self.shared.metrics.queue_delay.observe(time.monotonic() - queued)
                await self._load_attempts(v, deadline)
            self.shared.metrics.load_time.labels(v.model).observe(time.monotonic() - started)
        except BaseException:
            if v.phase == LOADING:
                v.phase = UNLOADED
            raise
        finally:
            v.load_task = None
            self.pool.notify()

    async def _load_attempts(self, v: Version, deadline: float | None) -> None:
        errors: list[str] = []
        avoid: set[int] = set()
        for _ in range(self.cfg.load_attempts):
            try:
                await self.load_copy(v, avoid=frozenset(avoid), deadline=deadline)
            except LoadFailed as failed:
                errors.append(f"worker {failed.slot}: {failed.error}")
                avoid.add(failed.slot)
                self.shared.metrics.load_failures.labels(v.model).inc()
                blob = getattr(failed.error, "corrupt_blob", None)
                if blob:  # every worker reads the same bytes: no retry; verify is told
                    await asyncio.to_thread(self.caches.mark_corrupt, blob, f"model {v.display}")
                    break
                continue
            v.phase = UNLOADED  # not loading any more; Ready comes from the copy
            return
        v.phase = FAILED
        v.reason = (f"{len(errors)} failed loads: " + " | ".join(errors))[:2000]
        v.failed_until = time.monotonic() + self.cfg.failed_ttl_s
        v.error(v.reason)
        raise ModelLoadError(f"model {v.display!r} could not be loaded: {v.reason}")

    async def load_copy(self, v: Version, *, avoid: frozenset[int] = frozenset(),
                         deadline: float | None = None, extra: bool = False) -> Copy | None:
        """Load one copy of ``v`` on a worker that has none. An extra copy takes free
        memory only (None when there is none); a first copy may evict."""
        assert v.resolved is not None and v.view is not None
        need = v.size() or v.predicted
        placed = await self._place(v, need, avoid, deadline, evict=not extra)
        if placed is None:
            return None
        slot, why = placed
        copy = Copy(v, slot, key=f"{v.id}#{next(self._keys)}", extra=extra, placed=why)
        v.copies.append(copy)
        if v.hold is None:
            await asyncio.to_thread(self._take_hold, v)
        try:
            # What the worker checks the files against (load/integrity.py).
            files = await asyncio.to_thread(self.caches.integrity, v.cache)
            result: Loaded = await slot.call(Load(
                copy.key, v.resolved.runtime, v.resolved.settings(v.model, v.view),
                IntegrityCheck(files, self.cfg.verify_loads)))
        except (ModelLoadError, WorkerCrashedError) as exc:
            self.forget(copy, None)
            raise LoadFailed(slot.id, exc) from exc
        except BaseException:
            self.forget(copy, None)
            raise
        now = time.monotonic()
        copy.size = _copy_size(result.size, result.reported, v)
        v.metadata = result.metadata
        v.capabilities = {"generate": result.generate, "stream": result.stream}
        copy.state, copy.loaded_at, copy.last_used = READY, now, now
        if not v.last_used:
            v.last_used = now
        v.reason = None
        v.loads += 1
        # The worker's own memory: what it held before this load less the models it
        # held then (by its own word: an unload the server has begun may not have run).
        held = set(result.held)
        others = sum(c.size for o in self.versions() for c in o.copies
                     if c.slot is slot and c is not copy and c.key in held)
        slot.base_rss = max(result.rss_before - others, 0)
        self._update_bytes(v.model)
        return copy

    async def _place(self, v: Version, need: int, avoid: frozenset[int],
                     deadline: float | None, *, evict: bool = True
                     ) -> tuple[Slot, str] | None:
        """Find room (evicting idle copies) and a worker; wait while everything is busy.
        Returns the worker and the placement's reasons (evictions included)."""
        evicted: list[str] = []
        while True:
            here = frozenset(c.slot.id for c in v.copies)
            slots = self.pool.states()
            plan: Placement = place(
                need, slots, time.monotonic(), pool=self.pool.budget, exclude=here,
                avoid=avoid, evict=evict, min_resident_s=self.cfg.min_resident_s,
                prefer=v.prefetched_on)
            if plan.too_large:
                if not evict:
                    return None
                v.phase = FAILED
                v.reason = f"too large: {plan.reasons[0]}"
                v.failed_until = time.monotonic() + self.cfg.failed_ttl_s
                v.error(v.reason)
                raise ModelTooLargeError(f"model {v.display!r} {plan.reasons[0]}")
            if plan.slot is not None:
                copies = {c.key: c for o in self.versions() for c in o.copies}
                victims = [copies[key] for key in plan.evict if key in copies]
                # Start the unloads before any await: no request may pick a victim now.
                # The reason names no model: the victim may be in another bucket.
                tasks = [self.start_unload(c, "evicted to make room for another model",
                                            evicted=True) for c in victims]
                if tasks:
                    log.info("loading %s: %s", v.display, "; ".join(plan.reasons))
                    evicted += [x for x in plan.reasons if x.startswith("evict ")]
                    await asyncio.gather(*(asyncio.shield(t) for t in tasks))
                    continue  # plan again on what the workers hold now
                slot = self.pool.slot(plan.slot)
                if slot.alive:
                    return slot, "; ".join([*evicted, *plan.reasons])
                continue
            if not evict or not plan.wait:
                if not evict:
                    return None
                raise UnavailableError(f"no worker can take model {v.display!r}: "
                                       + "; ".join(plan.reasons))
            short = need - (self.pool.budget - sum(s.used for s in slots if s.alive))
            bloated = self.pool.bloated(short)
            if bloated is not None:
                await self.pool.recycle(bloated, short)
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimeoutError(
                    f"no room to load model {v.display!r} in time: {'; '.join(plan.reasons)}")
            # Woken when a request ends, a load or unload finishes, a worker dies;
            # polled too, for the churn guard's clock.
            await self.pool.changed(remaining if remaining is not None else math.inf)

    def _take_hold(self, v: Version) -> None:
        if v.hold is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.caches.open(v.cache))
        v.hold = stack

    def release_hold(self, v: Version) -> None:
        if v.hold is not None:
            hold, v.hold = v.hold, None
            hold.close()

    def forget(self, c: Copy, reason: str | None) -> None:
        """The copy is gone (unloaded, failed to load, or its worker died)."""
        v = c.version
        if c in v.copies:
            v.copies.remove(c)
        c.state = UNLOADED
        if v.copies and all(o.extra for o in v.copies):
            # The first copy went (evicted, let go, or its worker died): the oldest
            # of the others is the first one now, and not the first to go.
            min(v.copies, key=lambda o: o.loaded_at or math.inf).extra = False
        if not v.copies:
            self.release_hold(v)
            if reason is not None:
                v.reason = reason
        self._update_bytes(v.model)
        self.pool.notify()

    def start_unload(self, c: Copy, reason: str, evicted: bool = False) -> asyncio.Task:
        """The copy's one unload task (started now, synchronously, if none runs).
        From now on no request picks it; those it has in flight finish first."""
        if c.unload_task is None:
            c.state = UNLOADING
            c.unload_task = asyncio.get_running_loop().create_task(
                self._unload_now(c, reason, evicted))
        return c.unload_task

    async def _unload_now(self, c: Copy, reason: str, evicted: bool) -> None:
        v = c.version
        try:
            while c.inflight and c.slot.alive:
                await self.pool.changed()
            if c.slot.alive:
                await c.slot.call(Unload(c.key))
        except CachemeshError as exc:
            log.warning("unload of %s: %s", c.key, exc)
        finally:
            if evicted:
                v.evictions += 1
                self.shared.metrics.evictions.labels(v.model).inc()
            self.forget(c, reason)
            c.unload_task = None

    async def load(self, dep: Deployment, *, wait: bool = True) -> None:
        """Load the versions that take traffic now (the repository extension's load)."""
        targets = [dep.versions[label] for label in dep.doc.serving()]
        for v in targets:
            if v.phase == FAILED:
                v.failed_until = 0.0  # an explicit load clears the mark
        if wait:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            await asyncio.gather(*(self.ensure_loaded(v, BACKGROUND, deadline)
                                   for v in targets))
        else:
            for v in targets:
                self.shared.background.start(self.load_quietly(v))

    async def unload(self, dep: Deployment) -> None:
        """Unload every copy of every version (the repository extension's unload)."""
        busy = sum(v.inflight for v in dep.versions.values())
        if busy:
            raise ConflictError(f"model {dep.name!r} has {busy} request(s) in flight")
        tasks = [self.start_unload(c, "unloaded on request")
                 for v in dep.versions.values() for c in list(v.copies) if c.state != LOADING]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    def slot_lost(self, slot: Slot, reason: str) -> None:
        """The one rule for a slot that died (a worker now, a node later): its copies
        are forgotten, except those being loaded there, which their loader retries
        elsewhere; the other copies of a version keep serving. What was in flight on it
        failed already, and is not replayed."""
        for v in self.versions():
            for c in [c for c in v.copies if c.slot is slot and c.state != LOADING]:
                left = [o for o in v.copies if o is not c and o.state != UNLOADING]
                self.forget(c, None if left else f"{reason}; loads again on demand")
                if left:
                    log.warning("%s: lost its copy on worker %d; %d left", v.display,
                                slot.id, len(left))

    async def add_copy(self, v: Version, why: str) -> None:
        try:
            async with self.queue.slot(BACKGROUND):
                if v.removed or not v.ready_copies():
                    return
                copy = await self.load_copy(v, extra=True)
            if copy is None:
                v.scaling = f"{why}; no worker has room for another copy without evicting"
            else:
                log.info("%s: another copy on worker %d (%s)", v.display, copy.slot.id, why)
        except LoadFailed as failed:
            v.error(f"extra copy on worker {failed.slot}: {failed.error}")
            self.shared.metrics.load_failures.labels(v.model).inc()
        except CachemeshError as exc:
            v.error(f"extra copy: {exc}")
        finally:
            v.copy_task = None

    def _update_bytes(self, name: str) -> None:
        dep = self.models.get(name)
        total = sum(c.size for v in dep.versions.values() for c in v.copies
                    if c.state == READY) if dep else 0
        if total:
            self.shared.metrics.model_bytes.labels(name).set(total)
        else:
            with contextlib.suppress(KeyError):
                self.shared.metrics.model_bytes.remove(name)


def _copy_size(measured: int, reported: bool, v: Version) -> int:
    """What a loaded copy holds, for the memory accounting. RSS growth undercounts a
    load into memory its worker freed before (the allocator reuses it: a version
    reloaded after a rollback measured 1 byte), and an undercounted copy looks free
    to the placement of the next one; below half its bytes on disk, the prediction
    stands in. A size the runtime reports itself is taken as it is."""
    if not reported and measured < v.disk_bytes // 2:
        return max(v.predicted, measured, 1)
    return max(measured, 1)
