"""The origin's read: one byte range of an object, retried until it landed or gave up.

A transfer (``transfer.py``) hands each range it wants to a *read*, a callable
``read(start, end, sink, stop)`` that puts the bytes ``[start, end)`` into ``sink``
at their own offsets and returns once they are all there. :class:`OriginRead` is the
read of the object's origin, through the source's ``FetchRequest.read``; a peer's read
(``swarm.py``) is the other kind.

What :class:`OriginRead` does for one range: it reads, joins small reads into writes
(``slots.Coalescer``), and on a transient failure (a cut connection, a 5xx, a response
under the low-speed limit) sleeps with backoff and asks again from the byte where the
last response stopped. Failures in a row without progress are bounded by the retry
policy; bytes that arrived count as progress only if they are kept and came fast
enough. An origin without ranges can only stream the whole object from byte 0: a cut
stream starts the object over (``Sink.restart``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol

from ..errors import SourceError, TransientSourceError
from .retry import RetryPolicy
from .slots import Coalescer

if TYPE_CHECKING:
    from .fetcher import FetchRequest


class Sink(Protocol):
    """Where a read puts the bytes it receives: the transfer's partial file."""

    def write(self, pos: int, data: bytes | memoryview) -> None: ...

    def restart(self) -> None:
        """An origin without ranges started the object over at byte 0."""


class TooSlow(TransientSourceError):
    """A response that brought bytes under the low-speed limit: dropped, and a failure."""


class LowSpeed:
    """curl's ``--speed-limit``/``--speed-time`` for one response: fewer than ``limit``
    bytes/s, averaged over a window of ``window_s`` seconds, ends it. Checked as bytes
    arrive; an origin that sends nothing at all meets the read timeout instead."""

    def __init__(self, name: str, limit: int, window_s: float, who: str = "the origin",
                 settings: str = " (CACHEMESH_FETCH_LOW_SPEED_LIMIT,"
                                 " CACHEMESH_FETCH_LOW_SPEED_TIME)") -> None:
        self.name, self.limit, self.window_s = name, limit, window_s
        self.who, self.settings = who, settings
        self._start = time.monotonic()
        self._bytes = 0

    def check(self, n: int) -> None:
        if self.limit <= 0:
            return
        self._bytes += n
        elapsed = time.monotonic() - self._start
        if elapsed < self.window_s:
            return
        if self._bytes < self.limit * elapsed:
            raise TooSlow(
                f"{self.name}: {self.who} sent {self._bytes} bytes in {elapsed:.0f} s, under"
                f" the low-speed limit of {self.limit} bytes/s over {self.window_s:g} s"
                f"{self.settings}")
        self._start, self._bytes = time.monotonic(), 0


class OriginRead:
    """The read of one object's origin (see the module docstring)."""

    def __init__(self, request: FetchRequest, retry: RetryPolicy,
                 low_speed: tuple[int, float]) -> None:
        self.req = request
        self.retry = retry
        self.low_speed = low_speed

    def __call__(self, start: int, end: int, sink: Sink, stop: threading.Event) -> None:
        req, retry = self.req, self.retry
        pos = start
        failures = 0
        out = Coalescer(sink.write)
        while pos < end and not stop.is_set():
            progressed = False
            speed = LowSpeed(req.name, *self.low_speed)
            try:
                reader = req.read(pos, end)
                try:
                    for data in reader:
                        n = len(data)
                        if n == 0:
                            continue
                        if pos + n > end:
                            raise SourceError(
                                f"{req.name}: the origin sent more than the bytes [{start}, {end})"
                                " asked for"
                            )
                        out.add(pos, data)
                        pos += n
                        progressed = True
                        if stop.is_set():
                            return
                        speed.check(n)
                finally:
                    out.flush()  # what arrived is kept, whatever happens next
                    close = getattr(reader, "close", None)
                    if close is not None:
                        close()
                if pos < end:
                    raise TransientSourceError(
                        f"{req.name}: the response ended at byte {pos}, expected {end}"
                    )
            except TransientSourceError as exc:
                # Bytes count as progress only if they are kept (an origin without
                # ranges restarts from byte 0, and what it sent is thrown away) and
                # came fast enough (a trickle would otherwise reset the count for ever).
                if progressed and req.ranged and not isinstance(exc, TooSlow):
                    failures = 0
                failures += 1
                if failures > retry.retries:
                    why = ("attempts without progress" if req.ranged else "attempts; the origin"
                           " serves no ranges, so each one starts again at byte 0")
                    raise TransientSourceError(
                        f"{exc} (gave up after {failures} {why})",
                        retry_after=exc.retry_after,
                    ) from exc
                if not req.ranged and pos > start:
                    sink.restart()
                    pos = start
                retry.sleep(retry.delay(failures, exc.retry_after), stop)
