"""Progress of one object, told to the pull's ``on_bytes`` once per byte whatever happens.

A fetch may resume (bytes already on disk count when it starts), retry a read (bytes
kept count once), or start an object over after it failed verification (nothing is
counted twice: the count restarts below the high-water mark already reported).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Progress is told to ``on_bytes`` in steps of at least this much (and at the end),
# or after this long while bytes arrive: twice a second, so that a slow origin's pull
# shows its bytes at least once a second whenever its reads happen to land.
REPORT_BYTES = 4 * 1024 * 1024
REPORT_INTERVAL_S = 0.5


class Progress:
    """Reports each byte of one object once through ``on_bytes``, whatever retries happen.

    Reports are batched (REPORT_BYTES at a time, or what came in REPORT_INTERVAL_S, and
    at the end): the cache's tracker does real work per call, and a network read is
    64 KiB–1 MiB.
    """

    def __init__(self, on_bytes: Callable[[int], None] | None) -> None:
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self._current = 0  # bytes of the object we hold now
        self._reported = 0  # high-water mark told to on_bytes
        self._reported_at = time.monotonic()

    def _report(self, at_least: int = 1) -> None:
        delta = 0
        now = time.monotonic()
        with self._lock:
            pending = self._current - self._reported
            due = now - self._reported_at >= REPORT_INTERVAL_S
            if pending >= at_least or (pending > 0 and due):
                delta = pending
                self._reported = self._current
                self._reported_at = now
        if delta and self._on_bytes is not None:
            self._on_bytes(delta)

    def advance(self, n: int) -> None:
        with self._lock:
            self._current += n
        self._report(REPORT_BYTES)

    def set(self, total: int) -> None:
        with self._lock:
            self._current = total
        self._report()

    def flush(self) -> None:
        self._report()

    def restart(self) -> None:
        with self._lock:
            self._current = 0
