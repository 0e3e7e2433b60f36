"""Retries with exponential backoff and full jitter.

A small loop rather than tenacity: what counts as one attempt depends on the
fetcher's state (a ranged read that delivered bytes before the connection was
cut made progress, so its failure count starts over, and the next attempt
resumes at the byte where it stopped). Sources decide what is worth retrying by
raising :class:`~cachemesh.errors.TransientSourceError`; everything else fails
at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import TransientSourceError

T = TypeVar("T")
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # failures in a row, without progress, that are retried
    backoff_s: float = 0.5  # first backoff; doubles each time, up to MAX_BACKOFF_S

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``failures + 1`` (full jitter, AWS style)."""
        ceiling = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))
        wait = random.uniform(0, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_BACKOFF_S))
        return wait

    def call(self, fn: Callable[[], T], *, stop: threading.Event | None = None) -> T:
        """Run ``fn`` until it succeeds, retrying transient errors (listing, HEAD)."""
        failures = 0
        while True:
            try:
                return fn()
            except TransientSourceError as exc:
                failures += 1
                if failures > self.retries:
                    raise
                self.sleep(self.delay(failures, exc.retry_after), stop)

    @staticmethod
    def sleep(seconds: float, stop: threading.Event | None) -> None:
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)
