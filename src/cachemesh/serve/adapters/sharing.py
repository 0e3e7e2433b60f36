"""What this node shares with its peers: its verified blobs, and what landed of those it fetches.

The protocol-free core of the peer route (``serve/adapters/blobs.py``; the wire protocol is drawn
in ``fetch/peer_http.py``). For one sha256 it finds an :class:`Offer`: the verified blob
in the store, or the landed ranges of a fetch of that content (``fetch.Landing``: a
fetch of a file whose origin published its sha256 lands where the sha256 alone finds
it), and says whether the caller may have it.

Who may read what:

- Every call carries the cluster token (``CACHEMESH_CLUSTER_TOKEN``), compared in constant
  time; a node without one shares nothing.
- A blob that a cache of an open bucket holds: any peer.
- A blob that only caches of protected buckets hold: a peer that presents the token of
  one of those buckets (``X-Cachemesh-Bucket-Token``); for any other it does not exist.
- A blob that no cache holds yet (it is being pulled, or was just verified): its bucket
  is not known until the pull links it, so it is served only to a peer that opens every
  protected bucket with a cache being pulled now; with no such pull, to any peer.

At most :data:`MAX_UPLOADS` ranges are sent at once, and one range goes to one peer at a
time (and rests :data:`RANGE_REST_S` after): others asking for it are told to come back
(503) and ask a holder that has it by then. A new piece so leaves this node about once
and spreads from peer to peer, as a BitTorrent seed does with super-seeding, instead of
every peer taking it from the first node at once (that node's upload link would then
set the pace of the whole fleet).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ...caches.catalog import CacheCatalog
from ...errors import NotFoundError, UnauthorizedError
from ...fetch import Landing
from ...fetch.pieces import PieceList, PieceLists

if TYPE_CHECKING:
    from ...config import Settings
    from ...store import Store

# Ranges this node sends to peers at once.
MAX_UPLOADS = 4
# After a range went to one peer, others asking for it are sent elsewhere this long: the
# peer that just got it shows it within a checkpoint, and serves them in turn.
RANGE_REST_S = 0.15


@dataclass(frozen=True)
class Offer:
    """What this node can send of one blob now."""

    state: Literal["verified", "fetching", "partial"]
    size: int
    ranges: tuple[tuple[int, int], ...]  # half-open [start, end)
    path: Path  # the file to read them from

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.ranges)



class BlobShare:
    """The blobs of one store, as peers may see them (see the module docstring)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self._catalog = CacheCatalog(store.db)
        token = settings.cluster.token
        self._token = hashlib.sha256(token.encode()).digest() if token else None
        self.fault = settings.cluster.peer_fault
        self.landing = Landing(store)
        self.piece_lists = PieceLists(store)
        self._uploads = threading.BoundedSemaphore(MAX_UPLOADS)
        self._sending: set[tuple[str, int, int]] = set()
        self._sent: dict[tuple[str, int, int], float] = {}  # range -> until when it rests
        self._lock = threading.Lock()
        self.served_bytes = 0
        self.requests: Counter[str] = Counter()

    # -- who asks -----------------------------------------------------------------------

    def authenticate(self, bearer: Sequence[str]) -> None:
        """Raise unless one of the bearer tokens is the cluster token."""
        if self._token is None:
            raise UnauthorizedError("this node shares no blobs: CACHEMESH_CLUSTER_TOKEN is"
                                    " not set")
        if not bearer:
            raise UnauthorizedError("peer calls need the cluster token"
                                    " (Authorization: Bearer <CACHEMESH_CLUSTER_TOKEN>)")
        ok = False
        for token in bearer[:8]:
            digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
            ok |= hmac.compare_digest(digest, self._token)
        if not ok:
            raise UnauthorizedError("the cluster token is not valid", invalid=True)

    def may_read(self, sha256: str, tokens: Sequence[str]) -> bool:
        """Whether a caller with these bucket tokens may have the blob (module docstring)."""
        return self._may_read(sha256, tokens)

    def _may_read(self, sha256: str, tokens: Sequence[str]) -> bool:
        buckets = self.store.buckets
        holders = self._catalog.blob_buckets(sha256)
        if holders:
            return any(not buckets.is_protected(b) or buckets.opens(b, tokens)
                       for b in holders)
        return all(not buckets.is_protected(b) or buckets.opens(b, tokens)
                   for b in self._catalog.pulling_buckets())

    # -- what it gets ---------------------------------------------------------------------

    def offer(self, sha256: str, tokens: Sequence[str]) -> Offer:
        """What the caller may have of the blob now; NotFoundError if nothing."""
        found = self.find(sha256)
        if found is None or not self._may_read(sha256, tokens):
            raise NotFoundError(f"blob sha256:{sha256} is not on this node")
        return found

    def find(self, sha256: str) -> Offer | None:
        """What this node has of the blob, whoever asks (``offer`` checks who).

        The blob is looked for again after its fetch's record: a fetch that commits
        between the two looks has its record marked committed (and its partial gone) by
        the time the record is read, and the blob is then in the store. Without the
        second look a peer would be told "absent" at the very moment the blob became
        whole here, and go to the origin for what this node had."""
        found = self._verified(sha256)
        if found is not None:
            return found
        spot = self.landing.spot_of_sha256(sha256)
        landed = spot.read()
        if landed is None or landed.sha256 is not None:
            # No fetch of it; one that committed since the first look; or one that
            # committed a blob gc removed since.
            return self._verified(sha256)
        state: Literal["fetching", "partial"] = "fetching" if spot.fetching() else "partial"
        return Offer(state, landed.size, landed.ranges, spot.partial)

    def _verified(self, sha256: str) -> Offer | None:
        blob = self.store.blobs.path(sha256)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            return None
        return Offer("verified", size, ((0, size),) if size else (), blob)

    def stamp(self, sha256: str) -> tuple[object, ...]:
        """Changes whenever what :meth:`find` says may have changed (a stat or two)."""
        return (self.store.blobs.has(sha256), self.landing.spot_of_sha256(sha256).stamp())

    def pieces(self, sha256: str, tokens: Sequence[str]) -> PieceList:
        """The piece list of a verified blob the caller may have; NotFoundError otherwise."""
        found = self.offer(sha256, tokens)
        pieces = (self.piece_lists.get(sha256, found.size) if found.state == "verified"
                  else None)
        if pieces is None:
            raise NotFoundError(f"blob sha256:{sha256} is not verified on this node")
        return pieces

    # -- uploads --------------------------------------------------------------------------

    def begin_upload(self, sha256: str, start: int, end: int) -> str | None:
        """Take an upload slot for ``[start, end)``; None if taken, else why not: ``node``
        (MAX_UPLOADS run already) or ``range`` (this range is on its way to another peer,
        or just was: ask a peer that has it by now)."""
        key = (sha256, start, end)
        now = time.monotonic()
        with self._lock:
            if key in self._sending or self._sent.get(key, 0.0) > now:
                return "range"
            if not self._uploads.acquire(blocking=False):
                return "node"
            self._sending.add(key)
            if len(self._sent) > 4096:  # forget what rested long enough
                self._sent = {k: t for k, t in self._sent.items() if t > now}
        return None

    def end_upload(self, sha256: str, start: int, end: int, sent: int) -> None:
        key = (sha256, start, end)
        with self._lock:
            self._sending.discard(key)
            self._sent[key] = time.monotonic() + RANGE_REST_S
            self.served_bytes += sent
        self._uploads.release()

    def count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1
