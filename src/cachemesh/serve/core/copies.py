"""Extra copies of hot models: when to add one, when to let one go (pure).

A version's request rate is measured over the last :data:`RATE_WINDOW_S`
seconds. With a threshold of ``copy_rate`` requests per second per copy, a
version that takes more than ``n x copy_rate`` wants ``n + 1`` copies, up to
``max_copies`` and never more than there are slots (two copies never share a
worker: :func:`~.placement.place` excludes the slots that hold one). Copies are
added one at a time, into free memory only: an extra copy never evicts anything,
and it is the first thing evicted when a load needs room.

When the rate falls below 80 % of what the current copies are for, an extra
copy goes after ``cooldown_s`` seconds of that (one at a time, each after its
own cool-down), so that a rate hovering at the threshold does not load and
unload copies back and forth.

Requests are spread over a version's ready copies by requests in flight
(:func:`pick`): the copy with fewest wins, the one picked longest ago on a tie.

:func:`decide` and :func:`pick` are pure; :class:`CopyScaler` applies the
decisions every :data:`SCALE_INTERVAL_S` seconds, through the loader.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .loading import Loader
    from .pool import WorkerPool
    from .state import Deployment

log = logging.getLogger("cachemesh.serve")

RATE_WINDOW_S = 3.0
DOWN_FACTOR = 0.8
SCALE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class CopyPolicy:
    copy_rate: float  # requests/s per copy above which another is added; 0: one copy only
    max_copies: int  # 0: as many as there are slots
    cooldown_s: float

    @classmethod
    def of(cls, serve: Any, scaling: Any) -> CopyPolicy:
        """The server's settings (``ServeSettings``), overridden by a document's ``scaling``."""
        def pick(own: Any, default: Any) -> Any:
            return default if own is None else own

        return cls(pick(scaling.copy_rate, serve.copy_rate),
                   pick(scaling.max_copies, serve.max_copies),
                   pick(scaling.cooldown_s, serve.copy_cooldown_s))


class RateMeter:
    """Requests per second over a sliding window, from a running count."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, count: int) -> float:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


@dataclass(frozen=True)
class Scale:
    delta: int  # +1: add a copy; -1: let an extra copy go; 0: keep
    low_since: float | None  # when the rate fell below what the copies are for
    reason: str


def decide(rate: float, copies: int, policy: CopyPolicy, slots: int, now: float,
           low_since: float | None) -> Scale:
    """What to do about one version that has ``copies`` copies on ``slots`` live slots."""
    cap = max(1, min(policy.max_copies or slots, slots))
    if policy.copy_rate <= 0:
        up = down = 1
    else:
        up = max(1, min(cap, math.ceil(rate / policy.copy_rate)))
        down = max(1, min(cap, math.ceil(rate / (policy.copy_rate * DOWN_FACTOR))))
    if up > copies:
        return Scale(+1, None, f"{rate:.1f} requests/s is more than {policy.copy_rate:g}/s"
                               f" for each of {copies} cop{'y' if copies == 1 else 'ies'}")
    if down >= copies:
        return Scale(0, None, "")
    if low_since is None:
        return Scale(0, now, f"{rate:.1f} requests/s: cooling down before letting a copy go")
    if now - low_since >= policy.cooldown_s:
        return Scale(-1, now, f"{rate:.1f} requests/s for {policy.cooldown_s:g}s:"
                              f" {down} cop{'y is' if down == 1 else 'ies are'} enough")
    return Scale(0, low_since, "cooling down")


class _Pickable(Protocol):
    inflight: int
    picked: int


def pick(copies: Sequence[_Pickable]) -> Any:
    """The copy to send a request to: fewest requests in flight, then least recently picked."""
    best = copies[0]
    for c in copies[1:]:
        if (c.inflight, c.picked) < (best.inflight, best.picked):
            best = c
    return best


class CopyScaler:
    """Measures every version's rate and adds or lets go of its extra copies."""

    def __init__(self, models: Mapping[str, Deployment], loader: Loader, pool: WorkerPool,
                 draining: Callable[[], bool]) -> None:
        self.models = models
        self.loader = loader
        self.pool = pool
        self.draining = draining  # a draining server adds no copy and lets none go

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SCALE_INTERVAL_S)
            try:
                self.scale(time.monotonic())
            except Exception:  # a bug here must not stop the loop
                log.exception("copy scaler")

    def scale(self, now: float) -> None:
        from .state import LOADING  # (state.py imports this module)

        alive = len(self.pool.alive())
        draining = self.draining()
        for dep in list(self.models.values()):
            for v in dep.versions.values():
                v.rate = v.meter.sample(now, v.requests)
                ready = v.ready_copies()
                if not ready or v.removed or dep.removed or draining:
                    v.low_since = None
                    continue
                counted = len(ready) + sum(1 for c in v.copies if c.state == LOADING)
                s = decide(v.rate, counted, dep.policy, alive, now, v.low_since)
                v.low_since = s.low_since
                if s.reason:
                    v.scaling = s.reason
                if s.delta > 0 and v.copy_task is None and v.load_task is None:
                    v.copy_task = self.loader.shared.background.start(
                        self.loader.add_copy(v, s.reason))
                elif s.delta < 0 and len(ready) > 1:
                    victim = min(ready, key=lambda c: (c.inflight, c.last_used))
                    log.info("%s: letting the copy on worker %d go (%s)", v.display,
                             victim.slot.id, s.reason)
                    self.loader.start_unload(victim, "extra copy no longer needed")
