"""Where a copy of a model loads, and what leaves memory to make room: one pure function.

:func:`place` sees a snapshot of *slots* and returns a :class:`Placement` with
its reasons; it changes nothing. The caller carries the choice out (evicts,
then loads). A slot is whatever holds models (``slot.py``): a worker process of
this server now, a node of the mesh later. Its snapshot holds only what the
policy needs::

    SlotState id, alive, capacity (bytes it may hold at most, its own memory included),
              used (bytes it holds now), base (bytes it holds with no model),
              residents (the copies on it), load (requests in flight on it)
    Resident  key (one copy), model (what it is a copy of: never two on one slot),
              size, inflight, last_used, loaded_at, loading, uses

Slots may also draw on a shared ``pool``: the workers of one server share the
node's memory budget, so a model evicted from worker 2 makes room for a load
on worker 1. Nodes of a mesh have no pool; each is bounded by its own capacity
and only its own residents can make room on it.

Choosing a slot (``exclude``: slots that must not take it, because they hold
a copy of the model already; ``avoid``: slots a load failed on, used only when
nothing else can take it):

1. a slot that is not full (the model fits without evicting anything);
2. then the slot whose least recently used resident is oldest: its memory
   holds what is worth least (an empty slot counts as oldest of all);
3. then the slot with fewer residents and more free memory;
4. ties go to the slot with fewer requests in flight.

When no slot has room, the same order picks among the slots where evicting
idle residents makes room, in this order (segmented LRU, as caches such as
Caffeine do, so that a stream of one-off requests does not flush hot models):

- extra copies first: a copy of a model that keeps another copy elsewhere;
- then the less used half of the idle residents (by recent use: a count that
  halves every 30 s, kept by the caller), least recently used first;
- the more used half only when that is not enough.

A resident with requests in flight is never evicted, nor one that is loading
or unloading, nor one loaded less than ``min_resident_s`` ago; when only such
residents could make room, the answer is to wait. ``evict=False`` (for extra
copies) takes free room only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...config import format_size


@dataclass(frozen=True)
class Resident:
    """One copy of a model on a slot."""

    key: str
    model: str
    size: int  # measured after load (predicted while loading)
    inflight: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    loading: bool = False  # loading or unloading: neither evictable nor free
    uses: float = 0.0  # recent uses of the model, decayed (see the module docstring)


@dataclass(frozen=True)
class SlotState:
    """A slot (slot.py) as placement sees it, at one instant."""

    id: int
    alive: bool
    capacity: int
    used: int
    base: int = 0
    residents: tuple[Resident, ...] = ()
    load: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(frozen=True)
class Placement:
    slot: int | None  # None: no room now (wait), never (too_large), or none allowed
    evict: tuple[str, ...] = ()  # resident keys, in the order they go
    wait: bool = False
    too_large: bool = False
    reasons: tuple[str, ...] = field(default_factory=tuple)


def held(base: int, rss: int, sizes: int, reserved: int = 0) -> int:
    """What a worker holds: the larger of its RSS and its accounted memory (so a
    runtime that under-reports, or memory an unload did not give back, still
    counts), plus what loads in progress on it are predicted to take."""
    return max(rss, base + sizes) + reserved


def _oldest_use(s: SlotState) -> float:
    settled = [r.last_used for r in s.residents if not r.loading]
    return min(settled) if settled else -math.inf


def _rank(s: SlotState) -> tuple:
    # Its own headroom, not the pool's: of two workers sharing a budget, the one
    # that holds less.
    return (_oldest_use(s), len(s.residents), -s.free, s.load, s.id)


def _why(s: SlotState, now: float) -> str:
    oldest = _oldest_use(s)
    age = "empty" if oldest == -math.inf else f"least recently used {now - oldest:.1f}s ago"
    return (f"slot {s.id}: {age}, {len(s.residents)} model(s), holds {format_size(s.used)},"
            f" {s.load} in flight")


def last_copies(slots: Sequence[SlotState]) -> set[str]:
    """The key of each model's most recently used copy; its other copies are extra."""
    best: dict[str, Resident] = {}
    for s in slots:
        if not s.alive:
            continue
        for r in s.residents:
            if r.loading:
                continue
            other = best.get(r.model)
            if other is None or (r.last_used, r.key) > (other.last_used, other.key):
                best[r.model] = r
    return {r.key for r in best.values()}


def eviction_order(slots: Sequence[SlotState], now: float, *, min_resident_s: float = 0.0,
                   protect_share: float = 0.5) -> list[tuple[int, Resident]]:
    """Idle residents that may be evicted, first to go first, with their slot."""
    idle = [(s.id, r) for s in slots if s.alive for r in s.residents
            if r.inflight == 0 and not r.loading and now - r.loaded_at >= min_resident_s]
    last = last_copies(slots)
    by_use = sorted(r.uses for _, r in idle)
    cut = by_use[min(int(len(by_use) * (1 - protect_share)), len(by_use) - 1)] if idle else 0.0
    return sorted(idle, key=lambda sr: (sr[1].key in last,
                                        sr[1].uses >= cut and protect_share > 0,
                                        sr[1].last_used, sr[1].key))


def _make_room(s: SlotState, need: int, pool_short: float,
               order: list[tuple[int, Resident]], pooled: bool) -> list[Resident] | None:
    """The victims that make ``need`` bytes of room on ``s``, or None if none can."""
    local_short = need - s.free
    victims: list[Resident] = []
    for sid, r in order:
        if local_short <= 0 and pool_short <= 0:
            break
        on_s = sid == s.id
        # Room on another slot only helps when the shared pool is what is short.
        if not on_s and not (pooled and pool_short > 0):
            continue
        victims.append(r)
        pool_short -= r.size
        if on_s:
            local_short -= r.size
    return victims if local_short <= 0 and pool_short <= 0 else None


def place(need: int, slots: Sequence[SlotState], now: float, *, pool: int | None = None,
          exclude: frozenset[int] = frozenset(), avoid: frozenset[int] = frozenset(),
          evict: bool = True, min_resident_s: float = 0.0,
          protect_share: float = 0.5, prefer: int | None = None) -> Placement:
    """Choose a slot for a copy of ``need`` bytes, and the residents to evict first.
    ``prefer``: the slot to take among those with room without evicting (the one
    that read the copy's weights ahead)."""
    alive = [s for s in slots if s.alive]
    if not alive:
        return Placement(None, wait=True, reasons=("no worker is running",))
    bases = sum(s.base for s in alive)
    most = max(s.capacity - s.base for s in alive)
    if pool is not None:
        most = min(most, pool - bases)
    if need > most:
        limit = (f"the memory budget {format_size(pool)} less what the workers themselves"
                 f" hold ({format_size(bases)})" if pool is not None
                 else f"the largest slot's capacity ({format_size(most)} for models)")
        return Placement(None, too_large=True, reasons=(
            f"needs {format_size(need)}, more than {limit}",))
    allowed = [s for s in alive if s.id not in exclude]
    if not allowed:
        return Placement(None, reasons=(
            f"every running worker holds a copy already ({len(alive)})",))
    candidates = [s for s in allowed if s.id not in avoid] or allowed
    pool_free = pool - sum(s.used for s in alive) if pool is not None else math.inf
    free = {s.id: int(min(s.free, pool_free)) for s in candidates}
    header = f"needs {format_size(need)}; {format_size(max(max(free.values()), 0))} free"
    avoided = f"; avoiding slot(s) {sorted(avoid)}" if avoid & {s.id for s in allowed} else ""

    roomy = [s for s in candidates if free[s.id] >= need]
    if roomy:
        best = min(roomy, key=lambda s: (s.id != prefer, _rank(s)))
        why = "read its weights ahead" if best.id == prefer else _why(best, now)
        return Placement(best.id, reasons=(header, "not full: " + why + avoided))
    if not evict:
        return Placement(None, reasons=(header, "no slot has that much free without evicting"))

    order = eviction_order(alive, now, min_resident_s=min_resident_s, protect_share=protect_share)
    plans = {}
    for s in candidates:
        victims = _make_room(s, need, need - pool_free, order, pool is not None)
        if victims is not None:
            plans[s.id] = victims
    if not plans:
        idle_any = {r.key for _, r in eviction_order(alive, now, protect_share=protect_share)}
        busy = sum(1 for s in alive for r in s.residents if r.inflight or r.loading)
        young = sum(1 for s in alive for r in s.residents
                    if r.key in idle_any and now - r.loaded_at < min_resident_s)
        return Placement(None, wait=True, reasons=(header, (
            f"no room even after evicting every idle model ({busy} busy or loading,"
            f" {young} loaded less than {min_resident_s:g}s ago)")))
    best = min((s for s in candidates if s.id in plans), key=_rank)
    victims = plans[best.id]
    extra = {r.key for r in victims} - last_copies(alive)
    reasons = [header]
    for r in victims:
        what = "extra copy" if r.key in extra else "idle"
        reasons.append(f"evict {r.key} ({what} {now - r.last_used:.1f}s, {r.uses:.1f} recent"
                       f" uses, {format_size(r.size)})")
    reasons.append("after eviction: " + _why(best, now) + avoided)
    return Placement(best.id, tuple(r.key for r in victims), reasons=tuple(reasons))
