"""What every read of the fetcher shares: its connection slots, and writes joined from reads.

:class:`Slots`
    ``range_concurrency`` connections shared by every fetch of one fetcher, granted in
    order of rank (watched objects first, ``observe.py``), then of arrival.
:class:`Coalescer`
    Joins the small reads a socket delivers into writes of up to :data:`COALESCE_BYTES`.

Both serve any kind of read (an origin's, a peer's): a read holds a slot while it runs
and writes what it receives through a coalescer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from .progress import REPORT_INTERVAL_S

# Small network reads are joined into writes of up to this much.
COALESCE_BYTES = 1024 * 1024


class Slots:
    """The fetcher's connection slots, granted in order of rank, then of arrival.

    A semaphore lets a worker that just released a slot take it straight back,
    so one file's workers could keep every slot while another file (a shard
    index that a loader waits for) starves. Here waiters queue: the lowest rank
    first (``REGISTRY.rank``: watched objects in the order they were watched,
    then the rest), first come first served within a rank. A rank is looked up
    again whenever the queue's head is chosen, so a watch that begins while a
    transfer runs moves its next pieces forward.
    """

    def __init__(self, n: int) -> None:
        self._free = n
        self._cond = threading.Condition()
        self._waiting: list[tuple[Callable[[], int], int]] = []  # (rank of, ticket)
        self._tickets = itertools.count()

    def _head(self) -> tuple[Callable[[], int], int]:
        return min(self._waiting, key=lambda w: (w[0](), w[1]))

    def acquire(self, rank: Callable[[], int], stop: threading.Event) -> bool:
        """Wait for a slot; False if ``stop`` was set first."""
        with self._cond:
            me = (rank, next(self._tickets))
            self._waiting.append(me)
            try:
                while not (self._free > 0 and self._head() is me):
                    if stop.is_set():
                        return False
                    self._cond.wait(0.2)
                self._free -= 1
                return True
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()  # the head changed

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()


class Coalescer:
    """Joins small reads into writes of up to COALESCE_BYTES.

    A TLS connection delivers at most one 16 KiB record per read; writing,
    hashing and recording each of them costs more CPU than the bytes do.
    Reads of COALESCE_BYTES / 4 or more are written as they come, and nothing
    waits here longer than REPORT_INTERVAL_S (a slow origin's bytes show up).
    """

    def __init__(self, write: Callable[[int, bytes | memoryview], None]) -> None:
        self._write = write
        self._buf = bytearray(COALESCE_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0
        self._fill = 0
        self._since = 0.0  # when the oldest byte held here arrived

    def add(self, pos: int, data: bytes) -> None:
        n = len(data)
        if self._fill and (self._start + self._fill != pos or self._fill + n > len(self._buf)):
            self.flush()
        if n >= len(self._buf) // 4:
            self.flush()
            self._write(pos, data)
            return
        if self._fill == 0:
            self._start = pos
            self._since = time.monotonic()
        self._view[self._fill:self._fill + n] = data
        self._fill += n
        if time.monotonic() - self._since >= REPORT_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._fill:
            fill, self._fill = self._fill, 0
            self._write(self._start, self._view[:fill])
