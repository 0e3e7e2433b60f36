"""The fetcher: one object from an origin into a verified blob, fast and resumable.

What one :meth:`Fetcher.fetch` does::

    lock locks/fetch/KEY.lock  ─ busy? wait (reporting the holder's progress from
          │                      its state record), then look again
          ▼
    tmp/fetch/KEY.state says "blob X"? ── and blob X exists ──▶ done, no transfer
          │ no
          ▼
    a Transfer (transfer.py): resume tmp/fetch/KEY.part if its record matches, else
          │                   start it afresh; missing ranges split into pieces, each
          │                   read by worker threads that share the fetcher's
          │                   range_concurrency connection slots (slots.py); the
          │                   origin's read (reads.py) retries with backoff, resuming
          │                   at the byte where a cut connection stopped; the hasher
          │                   follows the contiguous prefix (hashing.py); a watched
          │                   fetch (observe.py) starts with small pieces that double,
          │                   so that its head lands first; every second: fdatasync
          │                   the part, then write the record
          ▼
    size, sha256 (md5, git blob id) checked against what the origin publishes ── mismatch:
          │                   discard, fetch once more, then IntegrityError
          ▼
    blobs.commit: fsync, 0444, link into blobs/sha256/, row ── record "blob X" ── unlock

``KEY`` is the sha256 of the request's identity: whatever names the bytes
before they are hashed (source, endpoint, object, ETag or version). Two
caches, two threads or two processes that need the same object take the same
flock, so the origin serves it once; a process that dies releases the lock
and whoever waited resumes its partial file. The on-disk format of the partial
and its record is documented in ``ranges.py``; other code reads it through
``landing.py``.

Progress (``on_bytes``) counts each byte of the object once (``progress.py``):
bytes already on disk when a fetch resumes are counted when it starts; bytes
fetched again after a failed verification are not counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IntegrityError
from ..store.blobs import BlobRef, check_sha256
from .landing import Landing, identity_key
from .observe import FetchObserver, Flight
from .progress import Progress
from .ranges import PartialFiles
from .retry import RetryPolicy
from .slots import Slots
from .transfer import CorruptTransfer, Transfer

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import Store
    from ..store.locks import FileLock
    from .peer_http import PeerClient
    from .peers import Peers

# How often a running fetch makes its landed ranges durable (the most a crash loses).
CHECKPOINT_INTERVAL_S = 1.0
# How often a process waiting for another's fetch of the same object looks again.
WAIT_POLL_S = 0.1
# A transfer whose bytes fail verification is fetched this many times in all.
INTEGRITY_ATTEMPTS = 2
# How digests are computed: "stream" (while fetching) or "end" (see hashing.py).
HASH_MODE = "stream"

#: ``read(start, end)``: the bytes ``[start, end)`` of one object, as an iterator of chunks.
RangeRead = Callable[[int, int], Iterator[bytes]]


@dataclass(frozen=True)
class FetchRequest:
    """One object, as a source describes it to the fetcher.

    ``identity`` names the bytes before they are hashed: the source, the
    endpoint, the object and its version (ETag, version id, commit), so that
    equal identities mean equal bytes. It is hashed for file and lock names
    and never written out. ``name`` is for people (messages, records): the
    object without credentials.

    ``read(start, end)`` yields the bytes ``[start, end)``. For an origin that
    cannot serve ranges (``ranged=False``) it is only called as
    ``read(0, size)`` and yields the whole object. It raises
    :class:`~cachemesh.errors.TransientSourceError` for failures worth retrying
    and other :class:`~cachemesh.errors.SourceError` for the rest; a response
    that ends early is retried by the fetcher.
    """

    identity: str
    size: int
    read: RangeRead
    ranged: bool = True
    sha256: str | None = None  # published by the origin; verified before the blob is visible
    md5: str | None = None  # e.g. a single-part S3 ETag
    git_sha1: str | None = None  # git's blob id: a Hub's non-LFS files
    name: str = "object"
    # False when the identity holds no version (a URL without ETag or
    # Last-Modified): a blob fetched earlier for it is then only reused by
    # fetches that were waiting for that very transfer.
    versioned: bool = True
    # Who gave the expected digests, for messages: None when the origin publishes
    # them, else the user's option (``"--sha256"``).
    digests_from: str | None = None
    # Set when ``sha256`` came from the cluster's origin mapping (cluster/blob_index.py):
    # what the node that wrote it checked against the origin (``("md5",)``, ``("size",)``).
    indexed: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.size < 0:
            raise IntegrityError(f"{self.name}: negative size {self.size}")
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", check_sha256(self.sha256.lower()))
        for kind, length in (("md5", 32), ("git_sha1", 40)):
            value = getattr(self, kind)
            if value is not None:
                value = value.lower()
                if len(value) != length or not set(value) <= set("0123456789abcdef"):
                    raise IntegrityError(f"{self.name}: not a {kind} hex digest: {value!r}")
                object.__setattr__(self, kind, value)

    @property
    def key(self) -> str:
        return identity_key(self.identity)

    @property
    def published(self) -> dict[str, str]:
        """The digests the origin publishes, by kind (``sha256``, ``md5``, ``git-sha1``)."""
        kinds = {"sha256": self.sha256, "md5": self.md5, "git-sha1": self.git_sha1}
        return {k: v for k, v in kinds.items() if v is not None}

    @property
    def verification(self) -> str:
        """What the bytes are checked against: a digest kind, or only ``size``. A sha256
        from the cluster's origin mapping counts as what its writer checked."""
        if self.indexed is not None:
            own = [k for k in self.published if k != "sha256"]
            return own[0] if own else (self.indexed[0] if self.indexed else "size")
        return next(iter(self.published), "size")


class Fetcher:
    """Fetches objects into one store. Thread-safe; share one per source and pull.

    ``range_concurrency`` connection slots are shared by every fetch running
    on this fetcher: a single large file may use all of them, several files
    share them. ``hash_mode`` is ``"stream"`` or ``"end"`` (see hashing.py; default
    :data:`HASH_MODE`).
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        hash_mode: str | None = None,
        checkpoint_s: float | None = None,
        peers: Peers | None = None,
        peer_client: PeerClient | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.chunk_size = settings.chunk_size
        self.concurrency = settings.range_concurrency
        self.retry = RetryPolicy(settings.fetch_retries, settings.retry_backoff_s)
        self.low_speed = (settings.fetch_low_speed_bytes, settings.fetch_low_speed_time_s)
        self.hash_mode = hash_mode or HASH_MODE
        self.checkpoint_s = CHECKPOINT_INTERVAL_S if checkpoint_s is None else checkpoint_s
        self.landing = Landing(store)
        self.dir = self.landing.dir
        self.slots = Slots(self.concurrency)
        if peers is None and settings.cluster.enabled and settings.cluster.token:
            from .etcd_peers import EtcdPeers  # cluster mode: the blob index in etcd

            peers = EtcdPeers.from_settings(settings)
        elif peers is None and settings.cluster.peering:
            from .peers import StaticPeers

            peers = StaticPeers.from_settings(settings.cluster)
        # Other nodes asked before the origin (swarm.py); None: the origin only.
        self.peers = peers
        self._client = peer_client  # made on first use (tests pass a fake)

    def partial_path(self, identity: str) -> Path:
        """Where the bytes of ``identity`` land while it is fetched."""
        return self.landing.spot(identity).partial

    def watch(self, identity: str) -> Flight:
        """A :class:`~.observe.Flight` that sees this process's fetches of ``identity``."""
        return self.landing.watch(identity)

    def fetch(
        self,
        request: FetchRequest,
        on_bytes: Callable[[int], None] | None = None,
        observer: FetchObserver | None = None,
    ) -> BlobRef:
        """Bring one object into the blob store, verified; returns its blob."""
        files = PartialFiles(self.dir, request.key)
        progress = Progress(on_bytes)
        lock = self.store.lock("fetch", request.identity)
        before = _signature(files.state)
        waited = self._wait_turn(lock, files, request, progress)
        # An unversioned identity may only reuse a record written while we waited.
        reusable = request.versioned or (waited and _signature(files.state) != before)
        try:
            for attempt in range(1, INTEGRITY_ATTEMPTS + 1):
                ref = self._committed(files, request) if reusable else None
                if ref is not None:
                    progress.set(request.size)
                    return ref
                try:
                    # A second attempt after bad bytes asks the origin alone.
                    transfer = self._transfer(self._resolved(request) if attempt == 1
                                              else request, files, progress, observer,
                                              peers=attempt == 1)
                    ref = transfer.run()
                    self._tell_peers(request, ref, transfer)
                    return ref
                except CorruptTransfer as exc:
                    files.discard()
                    progress.restart()
                    if attempt == INTEGRITY_ATTEMPTS:
                        why = ("the origin keeps sending other bytes" if request.digests_from
                               is None else f"check the digest given with {request.digests_from}")
                        raise IntegrityError(f"{exc} (fetched {attempt} times; {why})") from None
            raise AssertionError("unreachable")
        finally:
            lock.release()

    def _resolved(self, request: FetchRequest) -> FetchRequest:
        """The request with the sha256 that another node recorded for this origin file
        (cluster mode), so that peers can give it; the request itself otherwise."""
        if self.peers is None or request.sha256 is not None or not request.ranged:
            return request
        found = self.peers.resolve(request.identity, request.size)
        if found is None:
            return request
        from dataclasses import replace

        return replace(request, sha256=found.sha256, indexed=tuple(found.checked))

    def _tell_peers(self, request: FetchRequest, ref: BlobRef, transfer: Transfer) -> None:
        """After a verified fetch: a plain transfer offers the blob to peers (a swarm did
        so itself), and a file checked against what its origin publishes, or fetched
        wholly from it, gets its origin mapping (cluster/blob_index.py's trust rule)."""
        if self.peers is None:
            return
        from .swarm import SwarmTransfer

        swarm = isinstance(transfer, SwarmTransfer)
        if not swarm:
            self.peers.finished(ref.sha256, ref.size, ok=True)
        if request.digests_from is not None:
            return  # checked against the user's digest, not the origin's
        checked = list(request.published)
        if not checked and swarm:
            return  # only a size, and bytes from peers: nothing learnt from the origin
        self.peers.record_origin(request.identity, ref.sha256, ref.size, checked or ["size"])

    def _transfer(self, request: FetchRequest, files: PartialFiles, progress: Progress,
                  observer: FetchObserver | None, *, peers: bool) -> Transfer:
        """A transfer from peers first where there are any and the blob's sha256 is known
        before it is fetched (peers find blobs by content); else from the origin."""
        if (peers and self.peers is not None and request.sha256 is not None
                and request.ranged and request.size > 0):
            from .ledger import PeerLedger
            from .peer_http import PeerClient
            from .swarm import SwarmTransfer

            if self._client is None:
                self._client = PeerClient(self.settings)
            return SwarmTransfer(self, request, files, progress, observer, peers=self.peers,
                                 client=self._client, ledger=PeerLedger(self.store.home))
        return Transfer(self, request, files, progress, observer)

    def _wait_turn(
        self, lock: FileLock, files: PartialFiles, request: FetchRequest, progress: Progress
    ) -> bool:
        """Take the object's lock; while another fetch holds it, follow its progress.

        Returns whether we had to wait.
        """
        if lock.acquire(blocking=False):
            return False
        while not lock.acquire(timeout=WAIT_POLL_S):
            state = files.read_state()
            if state is not None and state.size == request.size:
                progress.set(request.size if state.sha256 else state.landed.total())
        return True

    def _committed(self, files: PartialFiles, request: FetchRequest) -> BlobRef | None:
        """The blob an earlier fetch of the same identity verified, if it is still there."""
        state = files.read_state()
        if state is None or state.sha256 is None or state.size != request.size:
            return None
        if request.sha256 is not None and state.sha256 != request.sha256:
            return None
        if not self.store.blobs.has(state.sha256, request.size):
            return None  # collected since; fetch again
        return BlobRef(state.sha256, request.size)


def _signature(path: Path) -> tuple[int, int] | None:
    """Which version of a record file is there (records are replaced by rename)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns
