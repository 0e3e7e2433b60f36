"""Byte ranges that have landed, and the partial file that holds them.

An object being fetched lives under ``$CACHEMESH_HOME/tmp/fetch/`` as two files,
both named by ``KEY``, the sha256 (hex) of the object's identity (source,
object, version: see :class:`~cachemesh.fetch.fetcher.FetchRequest`), so that
every process and every cache that wants the same bytes finds the same
partial::

    tmp/fetch/KEY.part    the object's bytes at their own offsets; a sparse
                          file of the object's full size, holes where
                          nothing has landed yet
    tmp/fetch/KEY.state   JSON, the record of what in KEY.part is good:
                          {"format": 1,
                           "object": "s3://bucket/key (redacted, for people)",
                           "size": 2147483648,
                           "landed": [[0, 33554432], [50331648, 67108864]],
                           "sha256": null}
                          "landed" lists sorted, disjoint, half-open [start, end)
                          intervals. "sha256" is set once the object was
                          verified and committed as a blob: the record then
                          says "these bytes are blob X" (KEY.part is gone), so
                          a later fetch of the same identity, or a process that
                          waited for it, finds the blob without the origin.

Write order, so that a crash (even of the machine) cannot lie: bytes are
``pwrite``-n to KEY.part; every checkpoint first ``fdatasync``-s KEY.part,
then writes the record to ``KEY.state.tmp``, ``fsync``-s it and renames it over
KEY.state. A record therefore only names bytes that were durable before it
was written. Without a directory fsync after the rename, a power cut may bring
back the previous record, which names a subset of the same durable bytes: still
true. Bytes written after the last checkpoint are simply fetched again.

Rejected: one small file per finished chunk (directory churn, and a loader
that wants "which ranges landed" would have to list a directory), and an
append-only log of ranges (needs compaction; the record stays tiny anyway
because adjacent ranges merge).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..store.locks import private_dirs

FORMAT = 1


class RangeSet:
    """Disjoint half-open intervals ``[start, end)``, merged as they are added.

    Not thread-safe by itself; the fetcher guards it with its own lock.
    """

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in intervals:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Every interval that touches [start, end) merges with it.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        """Take ``[start, end)`` out of the set (bytes found bad after they landed)."""
        if end <= start:
            return
        kept = []
        for s, e in self.intervals():
            if e <= start or s >= end:
                kept.append((s, e))
                continue
            if s < start:
                kept.append((s, start))
            if e > end:
                kept.append((end, e))
        self._starts = [s for s, _ in kept]
        self._ends = [e for _, e in kept]

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` is in the set."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def prefix_end(self) -> int:
        """End of the interval that starts at 0 (0 if byte 0 has not landed)."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def gaps(self, size: int) -> Iterator[tuple[int, int]]:
        """The intervals of ``[0, size)`` not in the set, in order."""
        pos = 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start >= size:
                break
            if start > pos:
                yield pos, start
            pos = max(pos, end)
        if pos < size:
            yield pos, size

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def copy(self) -> RangeSet:
        other = RangeSet()
        other._starts, other._ends = list(self._starts), list(self._ends)
        return other

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self.intervals() == other.intervals()

    def __repr__(self) -> str:
        return f"RangeSet({self.intervals()})"


def split(gaps: Iterable[tuple[int, int]], chunk: int, ramp_from: int = 0
          ) -> list[tuple[int, int]]:
    """Cut each gap into pieces of at most ``chunk`` bytes, in order.

    Pieces are aligned to multiples of ``chunk`` where the gap allows, so that a
    resumed fetch asks for the same byte ranges as the first one (friendlier to
    CDN and origin caches that key on the Range header).

    With ``ramp_from``, a gap that starts at byte 0 begins with a piece of that
    many bytes, and each next piece is twice as long, up to ``chunk``: with N
    pieces in flight at once the first bytes of the object then land first,
    instead of at 1/N of the speed while N full pieces share the connection.
    """
    pieces = []
    for start, end in gaps:
        pos = start
        size = ramp_from if start == 0 else 0
        while 0 < size < chunk and pos < end:
            pieces.append((pos, min(end, pos + size)))
            pos = min(end, pos + size)
            size *= 2
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            pieces.append((pos, stop))
            pos = stop
    return pieces


@dataclass
class PartialState:
    """The ``KEY.state`` record of one object (see the module docstring)."""

    size: int
    landed: RangeSet = field(default_factory=RangeSet)
    sha256: str | None = None
    object: str = ""

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "object": self.object,
            "size": self.size,
            "landed": [list(r) for r in self.landed.intervals()],
            "sha256": self.sha256,
        })

    @classmethod
    def from_json(cls, text: str) -> PartialState:
        """Parse a record; raises ValueError on anything malformed."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("unknown partial-state format")
        size = raw["size"]
        if not isinstance(size, int) or size < 0:
            raise ValueError("bad size")
        landed = RangeSet()
        for item in raw["landed"]:
            start, end = item
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= size):
                raise ValueError(f"bad range {item!r}")
            landed.add(start, end)
        sha = raw.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise ValueError("bad sha256")
        return cls(size=size, landed=landed, sha256=sha, object=str(raw.get("object", "")))


class PartialFiles:
    """Paths and durable writes of the two files of one object under ``tmp/fetch``."""

    def __init__(self, directory: Path, key: str) -> None:
        self.dir = directory
        self.key = key
        self.part = directory / f"{key}.part"
        self.state = directory / f"{key}.state"

    def read_state(self) -> PartialState | None:
        """The record, or None when it is missing or unreadable (start afresh)."""
        try:
            return PartialState.from_json(self.state.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_state(self, state: PartialState) -> None:
        """Replace the record atomically; the caller has made the bytes it names durable."""
        private_dirs(self.dir)
        tmp = self.state.with_name(self.state.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, state.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state)

    def discard(self) -> None:
        """Forget the object: the record first, so no record outlives its bytes."""
        for path in (self.state, self.state.with_name(self.state.name + ".tmp"), self.part):
            path.unlink(missing_ok=True)
