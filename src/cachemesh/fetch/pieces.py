"""Piece hashes: a blob cut into fixed-size pieces, a sha256 for each, like a torrent's list.

A blob's sha256 can only be checked once every byte is there. Bytes from peers are
checked sooner, piece by piece, against the blob's piece list, so that a bad piece is
found as it lands, fetched again alone, and the peer that served it is known::

    PieceList(sha256, size, piece_size, digests)
        piece i = bytes [i * piece_size, min(size, (i + 1) * piece_size))
        digests[i] = sha256 of piece i (hex)

A list is derived from a verified blob (:func:`compute` reads it, and re-checks the
blob's own sha256 on the way: bytes that rotted on disk give no list). A node keeps
the lists it computed beside its partial files, so they go with ``gc`` like the rest
of ``tmp/`` and are computed again when asked for::

    tmp/pieces/<sha256>.json   {"format": 1, "sha256": "...", "size": N,
                                "piece_size": 4194304, "digests": ["<hex>", ...]}

The list is only a shortcut to find bad bytes early: whatever a list says, the blob's
sha256 is checked before anything becomes visible. In cluster mode the node that
verified a blob against its origin publishes the list in etcd (``P/pieces/{sha256}``,
cluster/keys.py); with static peers a node asks a peer that holds the verified blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IntegrityError
from ..store.blobs import check_sha256
from ..store.locks import private_dirs

if TYPE_CHECKING:
    from ..store import Store

# Bytes per piece: what one peer request fetches and one hash checks. Smaller pieces
# spread sooner through a swarm and cost more requests (Dragonfly and BitTorrent
# clients use 1-16 MiB).
PIECE_SIZE = 4 * 1024 * 1024
FORMAT = 1
_READ = 4 * 1024 * 1024


def piece_ranges(size: int, piece_size: int = PIECE_SIZE) -> list[tuple[int, int]]:
    """The ``[start, end)`` of every piece of a blob of ``size`` bytes."""
    return [(s, min(size, s + piece_size)) for s in range(0, size, piece_size)]


@dataclass(frozen=True)
class PieceList:
    """The piece hashes of one blob (see the module docstring)."""

    sha256: str
    size: int
    piece_size: int
    digests: tuple[str, ...]

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        if self.size < 0 or self.piece_size <= 0:
            raise ValueError("bad size or piece size")
        if len(self.digests) != len(piece_ranges(self.size, self.piece_size)):
            raise ValueError(f"{len(self.digests)} piece hashes for {self.size} bytes in pieces"
                             f" of {self.piece_size}")
        for d in self.digests:
            check_sha256(d)

    def ranges(self) -> list[tuple[int, int]]:
        return piece_ranges(self.size, self.piece_size)

    def matches(self, index: int, data: bytes | memoryview) -> bool:
        """Whether ``data`` is piece ``index``."""
        return hashlib.sha256(data).hexdigest() == self.digests[index]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "sha256": self.sha256, "size": self.size,
                           "piece_size": self.piece_size, "digests": list(self.digests)})

    @classmethod
    def from_json(cls, text: str | bytes) -> PieceList:
        """Parse a list; raises ValueError on anything malformed."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError("unknown piece-list format")
            size, piece_size, digests = raw["size"], raw["piece_size"], raw["digests"]
            if not (isinstance(size, int) and isinstance(piece_size, int)
                    and isinstance(digests, list)):
                raise ValueError("bad size or digests")
            return cls(str(raw["sha256"]), size, piece_size, tuple(str(d) for d in digests))
        except (KeyError, TypeError, AttributeError, IntegrityError) as exc:
            raise ValueError(f"bad piece list: {exc}") from None


def compute(path: Path, sha256: str, size: int, piece_size: int = PIECE_SIZE
            ) -> PieceList | None:
    """The piece list of the blob at ``path``; None if its bytes are not ``sha256``."""
    whole = hashlib.sha256()
    digests = []
    buf = bytearray(min(_READ, piece_size))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        for start, end in piece_ranges(size, piece_size):
            piece = hashlib.sha256()
            pos = start
            while pos < end:
                n = f.readinto(view[:min(len(buf), end - pos)])
                if not n:
                    return None  # shorter than its size
                piece.update(view[:n])
                whole.update(view[:n])
                pos += n
            digests.append(piece.hexdigest())
        if f.read(1):
            return None  # longer than its size
    if whole.hexdigest() != sha256:
        return None
    return PieceList(sha256, size, piece_size, tuple(digests))


class PieceLists:
    """The piece lists of one store's verified blobs, computed once and kept in tmp/pieces."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = store.blobs.tmp_dir / "pieces"
        self._lock = threading.Lock()  # one computation at a time in this process

    def get(self, sha256: str, size: int) -> PieceList | None:
        """The list of a verified blob this store holds; None if it holds no such blob."""
        if not self.store.blobs.has(sha256, size):
            return None
        path = self.dir / f"{check_sha256(sha256)}.json"
        with self._lock:
            try:
                kept = PieceList.from_json(path.read_bytes())
                if kept.sha256 == sha256 and kept.size == size:
                    return kept
            except (OSError, ValueError):
                pass
            try:
                found = compute(self.store.blobs.path(sha256), sha256, size)
            except OSError:
                return None
            if found is not None:
                self._keep(path, found)
            return found

    def _keep(self, path: Path, pieces: PieceList) -> None:
        try:
            private_dirs(self.dir)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(pieces.to_json())
            os.replace(tmp, path)
        except OSError:
            pass  # a cache only: computed again next time
