"""The sha256 (and whatever other digest the origin publishes: an MD5 ETag, a
git blob id) of an object whose bytes land out of order.

A digest must see bytes in order, and parallel ranged reads deliver them out of
order. Two ways were measured (``benchmarks/fetch.py --hash-mode``):

``stream`` (the default)
    Follow the contiguous prefix of landed bytes while the fetch runs. A worker
    whose bytes extend the prefix hashes them from memory as it writes them;
    bytes that landed ahead of the prefix are read back from the page cache by
    a catch-up thread once the gap before them fills. When the last range lands
    only the tail is left to hash, so hashing overlaps the transfer.
``end``
    Hash the whole file after the last byte landed, reading it back from the
    page cache. Simpler, but the hashing time (sha256 runs at about 1.9 GB/s on
    one core with SHA-NI) is added to every transfer.

hashlib releases the GIL on large updates, so hashing runs beside the network
threads on another core.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import IntegrityError

READ_BACK = 4 * 1024 * 1024

# Digests besides the sha256, by the name FetchRequest gives them; each is
# made for an object of a given size.
_EXTRA: dict[str, Callable[[int], Any]] = {
    "md5": lambda size: hashlib.md5(),
    # git's blob id: sha1 over a "blob <size>\0" header, then the bytes.
    "git-sha1": lambda size: hashlib.sha1(b"blob %d\0" % size),
}


class PrefixHasher:
    """Digests of ``[0, size)`` of the file behind ``fd``, fed in order.

    The owner calls :meth:`offer` with bytes it just wrote (hashed in memory if
    they are next in line), :meth:`prefix` when the contiguous landed prefix
    grows (the catch-up thread reads what was not offered), and :meth:`finish`
    once everything landed.
    """

    def __init__(self, fd: int, size: int, *, also: Sequence[str] = (),
                 mode: str = "stream") -> None:
        if mode not in ("stream", "end"):
            raise ValueError(f"unknown hash mode {mode!r}")
        unknown = set(also) - set(_EXTRA)
        if unknown:
            raise ValueError(f"unknown digest(s) {sorted(unknown)}")
        self.fd, self.size, self.mode = fd, size, mode
        self.kinds = ["sha256", *also]
        self._cond = threading.Condition()
        self._hashed = 0
        self._prefix = 0
        self._busy = False
        self._closing = False
        self._error: BaseException | None = None
        self._new_digests()
        self._thread: threading.Thread | None = None
        if mode == "stream":
            self._thread = threading.Thread(target=self._catch_up, name="cachemesh-hash",
                                            daemon=True)
            self._thread.start()

    def _new_digests(self) -> None:
        self._digests = [hashlib.sha256()] + [_EXTRA[k](self.size) for k in self.kinds[1:]]

    def _update(self, data: bytes | memoryview) -> None:
        for d in self._digests:
            d.update(data)

    @property
    def hashed(self) -> int:
        return self._hashed

    def offer(self, pos: int, data: bytes | memoryview) -> bool:
        """Hash ``data`` (just written at ``pos``) now if it is next in line."""
        if self.mode != "stream":
            return False
        with self._cond:
            if self._busy or pos != self._hashed:
                return False
            self._busy = True
        try:
            self._update(data)
        finally:
            with self._cond:
                self._hashed += len(data)
                self._busy = False
                if self._prefix > self._hashed:  # wake the catch-up thread only for work
                    self._cond.notify_all()
        return True

    def prefix(self, end: int) -> None:
        """Bytes ``[0, end)`` have landed."""
        with self._cond:
            if end > self._prefix:
                self._prefix = end
                if end > self._hashed and not self._busy:
                    self._cond.notify_all()

    def reset(self) -> None:
        """Start over from byte 0 (a stream that cannot resume was restarted)."""
        with self._cond:
            while self._busy:
                self._cond.wait(0.01)  # nobody notifies for this rare case
            self._new_digests()
            self._hashed = self._prefix = 0

    def _catch_up(self) -> None:
        buf = bytearray(READ_BACK)
        view = memoryview(buf)
        try:
            while True:
                with self._cond:
                    while True:
                        if self._busy:  # a writer is hashing in memory
                            self._cond.wait()
                        elif self._prefix > self._hashed:
                            break
                        elif self._closing:
                            return
                        else:
                            self._cond.wait()
                    start = self._hashed
                    want = min(self._prefix - start, READ_BACK)
                    self._busy = True
                try:
                    self._update(self._read(view, start, want))
                finally:
                    with self._cond:
                        self._hashed += want
                        self._busy = False
                        self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - surfaces in finish()
            with self._cond:
                self._error = exc
                self._busy = False
                self._cond.notify_all()

    def _read(self, view: memoryview, start: int, want: int) -> memoryview:
        got = 0
        while got < want:
            n = os.preadv(self.fd, [view[got:want]], start + got)
            if n == 0:
                raise IntegrityError(
                    f"partial file ended at {start + got}, expected {self.size} bytes")
            got += n
        return view[:want]

    def finish(self) -> dict[str, str]:
        """Wait for (or do) the remaining hashing; returns {"sha256": hex, <also>: hex}."""
        if self.mode == "end":
            buf = bytearray(READ_BACK)
            view = memoryview(buf)
            self._new_digests()
            pos = 0
            while pos < self.size:
                want = min(READ_BACK, self.size - pos)
                self._update(self._read(view, pos, want))
                pos += want
            self._hashed = pos
        else:
            with self._cond:
                self._prefix = max(self._prefix, self.size)
                self._closing = True
                self._cond.notify_all()
            assert self._thread is not None
            self._thread.join()
            if self._error is not None:
                raise self._error
        if self._hashed != self.size:
            raise IntegrityError(f"hashed {self._hashed} of {self.size} bytes")
        return {k: d.hexdigest() for k, d in zip(self.kinds, self._digests, strict=True)}

    def close(self) -> None:
        """Stop the catch-up thread without a result (the fetch failed)."""
        if self._thread is not None and self._thread.is_alive():
            with self._cond:
                self._closing = True
                self._prefix = self._hashed  # nothing more to catch up
                self._cond.notify_all()
            self._thread.join()
