"""Where a model loads, and what leaves memory to make room: one pure function.

:func:`place` sees a snapshot of the workers and the loaded models and returns
a :class:`Placement` with its reasons; it changes nothing. The service carries
the choice out (evicts, then loads). Cluster mode (issue 8: copies, versions,
traffic splitting) replaces this function, not the service.

The budget covers what the workers hold: each worker's own memory (the
interpreter and the frameworks it imported) plus the models on it. A worker
holds the larger of its RSS and its baseline plus the sizes of its models, so a
runtime that under-reports, or memory that an unload did not give back, still
counts.

Eviction is least recently used among idle models: a model with requests in
flight is never evicted, nor one that is still loading. Two guards against
churn, so that a stream of one-off requests for cold models does not flush the
hot ones (segmented LRU, as caches such as Caffeine do):

- the less used half of the idle models (by recent use: a count that halves
  every 30 s, kept by the service) goes first, least recently used first; the
  more used half goes only when that is not enough;
- a model loaded less than ``min_resident_s`` ago is not evicted at all; when
  only such models (or busy ones) could make room, the load waits instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import format_size


@dataclass(frozen=True)
class WorkerView:
    id: int
    alive: bool
    base: int  # bytes the worker holds with no model
    rss: int  # measured now
    models: tuple[str, ...] = ()
    reserved: int = 0  # predicted bytes of loads in progress on it


@dataclass(frozen=True)
class ModelView:
    name: str
    worker: int
    size: int  # measured after load (predicted while loading)
    inflight: int
    last_used: float
    loaded_at: float
    loading: bool = False
    uses: float = 0.0  # recent uses, decayed (see the module docstring)


@dataclass(frozen=True)
class Placement:
    worker: int | None  # None: no room now (wait) or never (too_large)
    evict: tuple[str, ...] = ()
    wait: bool = False
    too_large: bool = False
    reasons: tuple[str, ...] = field(default_factory=tuple)


def held(w: WorkerView, models: Sequence[ModelView]) -> int:
    accounted = w.base + sum(m.size for m in models if m.worker == w.id)
    return max(w.rss, accounted) + w.reserved


def place(need: int, workers: Sequence[WorkerView], models: Sequence[ModelView],
          budget: int, now: float, *, min_resident_s: float = 0.0,
          protect_share: float = 0.5, avoid: frozenset[int] = frozenset()) -> Placement:
    """Choose a worker for a model of ``need`` bytes and the models to evict first."""
    alive = [w for w in workers if w.alive]
    if not alive:
        return Placement(None, wait=True, reasons=("no worker is running",))
    bases = sum(w.base for w in alive)
    if need > budget - bases:
        return Placement(None, too_large=True, reasons=(
            f"needs {format_size(need)}, more than the memory budget {format_size(budget)}"
            f" less what the workers themselves hold ({format_size(bases)})",))
    pool = [w for w in alive if w.id not in avoid] or alive
    holding = {w.id: held(w, models) for w in alive}
    free = budget - sum(holding.values())
    reasons = [f"needs {format_size(need)}; {format_size(max(free, 0))} of"
               f" {format_size(budget)} free"]
    victims: list[ModelView] = []
    if need > free:
        idle = [m for m in models if m.inflight == 0 and not m.loading]
        by_use = sorted(m.uses for m in idle)
        cut = by_use[min(int(len(by_use) * (1 - protect_share)), len(by_use) - 1)] if idle else 0
        idle.sort(key=lambda m: (m.uses >= cut and protect_share > 0, m.last_used))
        settled = [m for m in idle if now - m.loaded_at >= min_resident_s]
        for m in settled:
            if need <= free:
                break
            victims.append(m)
            free += m.size
            holding[m.worker] -= m.size
            reasons.append(f"evict {m.name} (idle {now - m.last_used:.1f}s, {m.uses:.1f} recent"
                           f" uses, {format_size(m.size)})")
        if need > free:
            busy = sum(1 for m in models if m.inflight or m.loading)
            young = len(idle) - len(settled)
            reasons.append(f"no room even after evicting every idle model ({busy} busy or"
                           f" loading, {young} loaded less than {min_resident_s:g}s ago)")
            return Placement(None, wait=True, reasons=tuple(reasons))
    target = min(pool, key=lambda w: (holding[w.id], len(w.models), w.id))
    reasons.append(f"worker {target.id} holds least ({format_size(holding[target.id])})"
                   + (f"; avoiding worker(s) {sorted(avoid)}" if avoid else ""))
    return Placement(target.id, tuple(m.name for m in victims), reasons=tuple(reasons))
