"""Watching an object while it is fetched: the hook for streaming loaders.

"One read of the origin serves both the cache and the loader": a loader that
wants tensors from a file that is still being fetched does not open a second
connection; it reads the fetcher's partial file, range by range, as the bytes
land. The fetcher tells observers three things:

``started(partial, size, landed)``
    The fetch of the object began (or was joined late), the bytes are being
    written to ``partial`` at their own offsets, and ``landed`` lists the
    ``[start, end)`` ranges already there (a resumed fetch has some). A second
    ``started`` means the earlier bytes failed verification and the object is
    being fetched afresh into a new partial file: forget what was read.
``landed(start, end)``
    Bytes ``[start, end)`` were written to the partial file and can be read
    from it now (they are in the page cache; ``pread`` sees them).
``finished(blob)`` or ``failed(error)``
    The bytes were verified and committed as ``blob`` (the same inode as the
    partial file: an open file descriptor of the partial stays valid and now
    reads the blob), or the fetch gave up.

Bytes reported by ``landed`` are **not verified yet**; only ``finished``
vouches for them. A loader may parse and copy them early, but must not hand
out a result before ``finished``.

Observer methods run on the fetcher's threads while it holds a lock: they
must be quick and must not block (record, notify, return). :class:`Flight` is
the ready-made observer: it keeps the landed ranges and lets any thread
``wait`` for a byte range.

Observers are attached per fetch (``Fetcher.fetch(..., observer=...)``) or by
identity, before or during the fetch, with ``Fetcher.watch``. Watching also
orders the work: the fetcher's connection slots go to watched objects first,
in the order they were first watched, and a watched object's head is fetched
in small pieces first (``fetcher.py``), so a loader that watches its files in
load order gets them, and their headers, in that order. Only fetches run
by this process are observed; a fetch that another process runs for the same
store is visible, coarsely, through its ``tmp/fetch/KEY.state`` record
(see ``ranges.py``). A loader streaming a file that a pull is fetching::

    source = parse_source(uri, options, settings)         # its own instance is fine
    file = next(f for f in source.list_files().files if f.path == "model.safetensors")
    with source.fetcher(store).watch(source.identity(file)) as flight:
        ...start the pull (Caches.ensure) in another thread...
        path = flight.wait(0, 8)                          # the safetensors header length
        header_len = int.from_bytes(read(path, 0, 8), "little")
        path = flight.wait(8, 8 + header_len)             # then the header, then tensors
        ...
        flight.wait(0, file.size)                         # the blob: verified
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol, Self

from .ranges import RangeSet


class FetchObserver(Protocol):
    def started(self, partial: Path, size: int, landed: list[tuple[int, int]]) -> None: ...

    def landed(self, start: int, end: int) -> None: ...

    def finished(self, blob: Path) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class Flight:
    """An observer that a loader can block on: ``flight.wait(start, end)``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._landed = RangeSet()
        self.partial: Path | None = None
        self.size: int | None = None
        self.blob: Path | None = None
        self.error: BaseException | None = None
        self.generation = 0  # bumped by every ``started``: a restart invalidates earlier reads
        self._unregister: list[object] = []

    # -- FetchObserver ------------------------------------------------------------

    def started(self, partial: Path, size: int, landed: list[tuple[int, int]]) -> None:
        with self._cond:
            self.partial, self.size, self.blob, self.error = partial, size, None, None
            self._landed = RangeSet(landed)
            self.generation += 1
            self._cond.notify_all()

    def landed(self, start: int, end: int) -> None:
        with self._cond:
            self._landed.add(start, end)
            self._cond.notify_all()

    def finished(self, blob: Path) -> None:
        with self._cond:
            self.blob = blob
            if self.size is not None:
                self._landed.add(0, self.size)
            self._cond.notify_all()

    def failed(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()

    # -- for the loader -----------------------------------------------------------

    def landed_ranges(self) -> list[tuple[int, int]]:
        with self._cond:
            return self._landed.intervals()

    @property
    def done(self) -> bool:
        return self.blob is not None or self.error is not None

    def wait(self, start: int, end: int, timeout: float | None = None) -> Path:
        """Block until ``[start, end)`` can be read; return the file to read it from.

        That is the partial file while the fetch runs, or the blob once it
        finished. Raises the fetch's error if it failed, and ``TimeoutError``
        if ``timeout`` seconds pass first (also when no fetch ever starts).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.blob is not None:
                    return self.blob
                if self.partial is not None and self._landed.covers(start, end):
                    return self.partial
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"bytes [{start}, {end}) did not land within {timeout} s")
                self._cond.wait(remaining)

    def close(self) -> None:
        """Stop watching (for flights made by :func:`watch`)."""
        for undo in self._unregister:
            undo()  # type: ignore[operator]
        self._unregister.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The rank of an object nobody watches: after every watched one.
UNWATCHED = 1 << 62


class _Registry:
    """Process-wide: which fetch is running for which partial file, and who watches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, object] = {}  # partial path -> the running transfer
        self._waiting: dict[str, list[FetchObserver]] = {}  # partial path -> watchers
        self._ranks: dict[str, int] = {}  # partial path -> order of its first watch
        self._next_rank = 0

    def rank(self, partial: Path) -> int:
        """The fetcher's priority for ``partial``'s pieces: watched objects in the order
        they were first watched (a loader watches its files in load order), then the rest."""
        with self._lock:
            return self._ranks.get(str(partial), UNWATCHED)

    def watch(self, partial: Path, observer: FetchObserver) -> None:
        key = str(partial)
        with self._lock:
            # A standing interest: it also sees later fetches of the same object.
            self._waiting.setdefault(key, []).append(observer)
            if key not in self._ranks:
                self._ranks[key] = self._next_rank
                self._next_rank += 1
            transfer = self._active.get(key)
        if transfer is not None:
            transfer.attach(observer)  # type: ignore[attr-defined]

    def unwatch(self, partial: Path, observer: FetchObserver) -> None:
        key = str(partial)
        with self._lock:
            waiting = self._waiting.get(key, [])
            if observer in waiting:
                waiting.remove(observer)
            if not waiting:
                self._waiting.pop(key, None)
                self._ranks.pop(key, None)
            transfer = self._active.get(key)
        if transfer is not None:
            transfer.detach(observer)  # type: ignore[attr-defined]

    def begin(self, partial: Path, transfer: object) -> list[FetchObserver]:
        """Register a running transfer; returns the observers that were waiting for it."""
        key = str(partial)
        with self._lock:
            self._active[key] = transfer
            return list(self._waiting.get(key, []))

    def end(self, partial: Path, transfer: object) -> None:
        with self._lock:
            if self._active.get(str(partial)) is transfer:
                del self._active[str(partial)]


REGISTRY = _Registry()


def watch_partial(partial: Path) -> Flight:
    """A :class:`Flight` for the fetch that writes ``partial`` (now or later) in this process."""
    flight = Flight()
    REGISTRY.watch(partial, flight)
    flight._unregister.append(lambda: REGISTRY.unwatch(partial, flight))
    return flight
