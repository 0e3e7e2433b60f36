"""The load queue: at most ``concurrency`` loads at once, the rest wait in order.

Waiters are served by priority (request-driven loads before eager and
repository loads), then first come, first served. A load that a request starts
waiting on after it was queued eagerly is promoted. The queue is bounded: when
``max_waiting`` loads already wait, another is refused with
:class:`~cachemesh.errors.UnavailableError` (a 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ...errors import UnavailableError

REQUEST, BACKGROUND = 0, 1


class Ticket:
    __slots__ = ("priority", "seq", "future")

    def __init__(self, priority: int, seq: int, future: asyncio.Future) -> None:
        self.priority, self.seq, self.future = priority, seq, future

    def __lt__(self, other: Ticket) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class LoadQueue:
    def __init__(self, concurrency: int, max_waiting: int) -> None:
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.running = 0
        self._heap: list[Ticket] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for t in self._heap if not t.future.done())

    def promote(self, ticket: Ticket | None, priority: int) -> None:
        if ticket is not None and priority < ticket.priority and not ticket.future.done():
            ticket.priority = priority
            heapq.heapify(self._heap)

    @asynccontextmanager
    async def slot(self, priority: int, hold: list[Ticket | None] | None = None) -> AsyncIterator[None]:
        """Wait for a load slot; ``hold[0]`` gets the ticket so the caller may promote it."""
        if self.running < self.concurrency and not self._heap:
            self.running += 1
        else:
            if self.waiting >= self.max_waiting:
                raise UnavailableError(
                    f"{self.waiting} model loads are waiting already; try again later",
                    retry_after=2.0)
            ticket = Ticket(priority, next(self._seq), asyncio.get_running_loop().create_future())
            heapq.heappush(self._heap, ticket)
            if hold is not None:
                hold[0] = ticket
            try:
                await ticket.future  # the releaser counted us as running
            except asyncio.CancelledError:
                if ticket.future.done() and not ticket.future.cancelled():
                    self._release()  # we were handed the slot as we gave up
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._heap:
            ticket = heapq.heappop(self._heap)
            if not ticket.future.done():
                ticket.future.set_result(None)
                return  # the slot passes on; running stays the same
        self.running -= 1
