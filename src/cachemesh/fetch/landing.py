"""Where the fetcher's objects land and which of their bytes have: the public way to read it.

A fetch writes an object's bytes into a partial file and says which ranges are good in
a record beside it (the files and their format: ``ranges.py``). Code outside the
fetcher reads that through this module, never through the files' names or format: a
loader streaming tensors out of a file still being pulled (``load/origin.py``), the
route that serves landed pieces to peers (``serve/adapters/blobs.py``)::

    landing = Landing(store)
    spot = landing.spot(identity)       # or landing.spot_of_sha256(hex): a content-named object
    spot.partial                        # the file its bytes land in, at their own offsets
    spot.read()                         # Landed(size, ranges, sha256) or None: the last record
    spot.fetching()                     # whether some process runs its fetch right now
    landing.watch(identity)             # a Flight: this process's fetches, range by range

What a record says is true when it is read: every range it names was written (and made
durable) before the record was, and a record with ``sha256`` names a verified blob
that ``Store.blobs`` holds (or held: gc may have collected it since). The bytes of a
partial are **not verified**: whoever reads them checks them against the object's
digests, or waits for the blob.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..store.locks import is_locked
from .observe import Flight, watch_partial
from .ranges import PartialFiles

if TYPE_CHECKING:
    from ..store import Store


def identity_key(identity: str) -> str:
    """The name of an object's partial, record and fetch lock: the sha256 of its identity."""
    return hashlib.sha256(identity.encode()).hexdigest()


def content_identity(sha256: str) -> str:
    """The identity of an object known by the sha256 of its bytes, whatever its origin.

    Sources use it for every file whose origin publishes a sha256, so a file and its
    partial are found from the sha256 alone (a peer asking for a blob knows only that).
    """
    return f"sha256:{sha256.lower()}"


@dataclass(frozen=True)
class Landed:
    """What the record of one object says."""

    size: int
    ranges: tuple[tuple[int, int], ...]  # sorted, disjoint, half-open [start, end)
    sha256: str | None  # set once the bytes were verified and became this blob

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` has landed."""
        if end <= start:
            return True
        return any(s <= start and end <= e for s, e in self.ranges)

    def total(self) -> int:
        return sum(e - s for s, e in self.ranges)


class LandingSpot:
    """Where one object lands (see the module docstring)."""

    def __init__(self, landing: Landing, key: str) -> None:
        self._files = PartialFiles(landing.dir, key)
        self._lock = landing.locks_dir / f"{key}.lock"

    @property
    def partial(self) -> Path:
        return self._files.part

    def read(self) -> Landed | None:
        """The object's record, or None when there is none (or it cannot be read)."""
        state = self._files.read_state()
        if state is None:
            return None
        return Landed(state.size, tuple(state.landed.intervals()), state.sha256)

    def stamp(self) -> tuple[int, int] | None:
        """Which version of the record is there (records are replaced by rename): a cheap
        way to see that it changed without reading it."""
        try:
            st = self._files.state.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def fetching(self) -> bool:
        """Whether a process holds the object's fetch lock now (its fetch runs, or waits)."""
        return is_locked(self._lock)


class Landing:
    """The landing places of one store's fetches."""

    def __init__(self, store: Store) -> None:
        self.dir = store.blobs.tmp_dir / "fetch"
        self.locks_dir = store.locks_dir / "fetch"  # Store.lock("fetch", identity)

    def spot(self, identity: str) -> LandingSpot:
        return LandingSpot(self, identity_key(identity))

    def spot_of_sha256(self, sha256: str) -> LandingSpot:
        return self.spot(content_identity(sha256))

    def watch(self, identity: str) -> Flight:
        """A :class:`~.observe.Flight` that sees this process's fetches of ``identity``."""
        return watch_partial(self.spot(identity).partial)
