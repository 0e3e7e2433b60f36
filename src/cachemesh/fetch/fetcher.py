"""The fetcher: one object from an origin into a verified blob, fast and resumable.

What one :meth:`Fetcher.fetch` does::

    lock locks/fetch/KEY.lock  ─ busy? wait (reporting the holder's progress from
          │                      its state record), then look again
          ▼
    tmp/fetch/KEY.state says "blob X"? ── and blob X exists ──▶ done, no transfer
          │ no
          ▼
    resume tmp/fetch/KEY.part if its record matches, else start it afresh
          │
          ▼
    missing ranges ──split──▶ pieces of chunk_size ──▶ worker threads, each holding
          │                   one of the fetcher's range_concurrency slots:
          │                   read piece (retry with backoff, resuming at the byte
          │                   where a cut connection stopped), pwrite at its offset
          │                   (small reads joined into writes of up to 1 MiB);
          │                   hasher follows the contiguous prefix (hashing.py)
          │                   (a watched fetch starts with small pieces that double:
          │                   its head lands first, for a streaming loader)
          │                   every second: fdatasync part, then write the record
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
and its record is documented in ``ranges.py``.

Progress (``on_bytes``) counts each byte of the object once: bytes already on
disk when a fetch resumes are counted when it starts; bytes fetched again after
a failed verification are not counted twice.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    AccessDeniedError,
    CapacityError,
    IntegrityError,
    SourceError,
    StoreError,
    TransientSourceError,
)
from ..store.blobs import BlobRef, check_sha256
from ..store.locks import private_dirs
from .hashing import PrefixHasher
from .observe import REGISTRY, FetchObserver, Flight, watch_partial
from .ranges import PartialFiles, PartialState, RangeSet, split
from .retry import RetryPolicy

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import Store
    from ..store.locks import FileLock

# How often a running fetch makes its landed ranges durable (the most a crash loses).
CHECKPOINT_INTERVAL_S = 1.0
# How often a process waiting for another's fetch of the same object looks again.
WAIT_POLL_S = 0.1
# A transfer whose bytes fail verification is fetched this many times in all.
INTEGRITY_ATTEMPTS = 2
# How digests are computed: "stream" (while fetching) or "end" (see hashing.py).
HASH_MODE = "stream"
# Small network reads are joined into writes of up to this much (see _Coalescer).
COALESCE_BYTES = 1024 * 1024
# A watched fetch (observe.py) starts with a piece this long; pieces double up to chunk_size.
WATCHED_FIRST_PIECE = 256 * 1024
# Progress is told to ``on_bytes`` in steps of at least this much (and at the end),
# or after this long while bytes arrive: twice a second, so that a slow origin's pull
# shows its bytes at least once a second whenever its reads happen to land.
REPORT_BYTES = 4 * 1024 * 1024
REPORT_INTERVAL_S = 0.5

# How messages name each digest kind.
_DIGEST_NAMES = {"git-sha1": "git blob id", "md5": "MD5"}

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
        """What the bytes are checked against: a digest kind, or only ``size``."""
        return next(iter(self.published), "size")


def identity_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()


class _Progress:
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


class _Corrupt(IntegrityError):
    """The fetched bytes do not match the origin's checksum (fetched again once)."""


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
    ) -> None:
        self.store = store
        self.chunk_size = settings.chunk_size
        self.concurrency = settings.range_concurrency
        self.retry = RetryPolicy(settings.fetch_retries, settings.retry_backoff_s)
        self.low_speed = (settings.fetch_low_speed_bytes, settings.fetch_low_speed_time_s)
        self.hash_mode = hash_mode or HASH_MODE
        self.checkpoint_s = CHECKPOINT_INTERVAL_S if checkpoint_s is None else checkpoint_s
        self.dir = store.blobs.tmp_dir / "fetch"
        self._slots = _Slots(self.concurrency)

    def partial_path(self, identity: str) -> Path:
        """Where the bytes of ``identity`` land while it is fetched."""
        return PartialFiles(self.dir, identity_key(identity)).part

    def watch(self, identity: str) -> Flight:
        """A :class:`~.observe.Flight` that sees this process's fetches of ``identity``."""
        return watch_partial(self.partial_path(identity))

    def fetch(
        self,
        request: FetchRequest,
        on_bytes: Callable[[int], None] | None = None,
        observer: FetchObserver | None = None,
    ) -> BlobRef:
        """Bring one object into the blob store, verified; returns its blob."""
        files = PartialFiles(self.dir, request.key)
        progress = _Progress(on_bytes)
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
                    return _Transfer(self, request, files, progress, observer).run()
                except _Corrupt as exc:
                    files.discard()
                    progress.restart()
                    if attempt == INTEGRITY_ATTEMPTS:
                        why = ("the origin keeps sending other bytes" if request.digests_from
                               is None else f"check the digest given with {request.digests_from}")
                        raise IntegrityError(f"{exc} (fetched {attempt} times; {why})") from None
            raise AssertionError("unreachable")
        finally:
            lock.release()

    def _wait_turn(
        self, lock: FileLock, files: PartialFiles, request: FetchRequest, progress: _Progress
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


class _Transfer:
    """One attempt at moving one object's missing bytes into its partial file."""

    def __init__(
        self,
        fetcher: Fetcher,
        request: FetchRequest,
        files: PartialFiles,
        progress: _Progress,
        observer: FetchObserver | None,
    ) -> None:
        self.f = fetcher
        self.req = request
        self.files = files
        self.progress = progress
        self.lock = threading.Lock()
        self.landed = RangeSet()
        self.observers: list[FetchObserver] = [observer] if observer is not None else []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.fd = -1
        self.hasher: PrefixHasher | None = None
        self._pending: deque[tuple[int, int]] = deque()
        self._saved: RangeSet | None = None
        self._started = False
        self._outcome: tuple[str, object] | None = None

    # -- observers ----------------------------------------------------------------

    def attach(self, observer: FetchObserver) -> None:
        with self.lock:
            if observer in self.observers:
                return
            self.observers.append(observer)
            if self._started:
                observer.started(self.files.part, self.req.size, self.landed.intervals())
            if self._outcome is not None:
                _tell(observer, *self._outcome)

    def detach(self, observer: FetchObserver) -> None:
        with self.lock:
            if observer in self.observers:
                self.observers.remove(observer)

    def _emit_started(self) -> None:
        with self.lock:
            self._started = True
            for o in self.observers:
                o.started(self.files.part, self.req.size, self.landed.intervals())

    def _emit_outcome(self, kind: str, value: object) -> None:
        with self.lock:
            self._outcome = (kind, value)
            for o in self.observers:
                _tell(o, kind, value)

    # -- the transfer ------------------------------------------------------------------

    def run(self) -> BlobRef:
        files = self.files
        waiting = REGISTRY.begin(files.part, self)
        for o in waiting:
            if o not in self.observers:
                self.observers.append(o)
        try:
            ref = self._run()
        except BaseException as exc:
            self._emit_outcome("failed", exc)
            raise
        else:
            self._emit_outcome("finished", self.f.store.blobs.path(ref.sha256))
            return ref
        finally:
            REGISTRY.end(files.part, self)

    def _open_partial(self) -> None:
        req, files = self.req, self.files
        state = files.read_state() if req.ranged else None
        resumable = (
            state is not None
            and state.sha256 is None
            and state.size == req.size
            and _size_of(files.part) == req.size
        )
        if not resumable:
            files.discard()
            state = None
        private_dirs(files.dir)
        self.fd = os.open(files.part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if state is None:
            os.ftruncate(self.fd, req.size)  # sparse: holes until bytes land
        else:
            self.landed = state.landed
            self._saved = state.landed.copy()

    def _run(self) -> BlobRef:
        req = self.req
        try:
            self._open_partial()
        except OSError as exc:
            raise _store_error(exc, self.files.dir) from exc
        try:
            self.progress.restart()
            self.progress.advance(self.landed.total())
            published = req.published
            self.hasher = PrefixHasher(self.fd, req.size, mode=self.f.hash_mode,
                                       also=[k for k in published if k != "sha256"])
            self.hasher.prefix(self.landed.prefix_end())
            self._emit_started()
            gaps = list(self.landed.gaps(req.size))
            # Someone reads this object while it lands (a streaming loader): its head first.
            ramp = WATCHED_FIRST_PIECE if self.observers else 0
            self._pending.extend(split(gaps, self.f.chunk_size, ramp) if req.ranged else gaps)
            try:
                self._run_workers()
            finally:
                self.progress.flush()
            digests = self.hasher.finish()
            sha = digests["sha256"]
            for kind, expected in published.items():
                if digests[kind] != expected:
                    label = _DIGEST_NAMES.get(kind, kind)
                    claim = (f"the origin publishes {expected}" if req.digests_from is None
                             else f"not the {expected} given with {req.digests_from}")
                    raise _Corrupt(f"{req.name}: the fetched bytes have {label} {digests[kind]},"
                                   f" {claim}")
        except BaseException as exc:
            if self.hasher is not None:
                self.hasher.close()
            self._close_fd()
            if not _keeps_partial(exc, req.ranged):
                self.files.discard()
            raise
        self._close_fd()
        # commit() fsyncs the bytes, makes them read-only and links them; the
        # record saying "these bytes are blob X" comes after, so it never names
        # a blob that is not there.
        ref = self.f.store.blobs.commit(self.files.part, sha, req.size)
        done = PartialState(req.size, RangeSet([(0, req.size)]), sha256=sha, object=req.name)
        try:
            self.files.write_state(done)
        except OSError:
            pass  # only a shortcut for later fetches; the blob is what matters
        return ref

    def _close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _run_workers(self) -> None:
        n = min(self.f.concurrency, len(self._pending))
        threads = [threading.Thread(target=self._work, name=f"cachemesh-fetch-{i}", daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        try:
            next_checkpoint = time.monotonic() + self.f.checkpoint_s
            for t in threads:
                while t.is_alive():
                    t.join(max(0.0, next_checkpoint - time.monotonic()))
                    if time.monotonic() >= next_checkpoint:
                        if self.req.ranged and self.error is None:
                            self._checkpoint()
                        next_checkpoint = time.monotonic() + self.f.checkpoint_s
        except BaseException:
            self.stop.set()
            for t in threads:
                t.join()
            raise
        finally:
            if self.req.ranged and (self.error is not None or self.stop.is_set()):
                # Keep what landed for the next attempt, whatever stopped us.
                try:
                    self._checkpoint()
                except OSError:
                    pass
        if self.error is not None:
            raise self.error
        if not self.landed.covers(0, self.req.size):
            raise AssertionError(f"{self.req.name}: workers finished with gaps {self.landed!r}")

    def _checkpoint(self) -> None:
        with self.lock:
            snapshot = self.landed.copy()
        if snapshot == self._saved:
            return
        os.fdatasync(self.fd)  # the bytes first, then the record that names them
        self.files.write_state(PartialState(self.req.size, snapshot, object=self.req.name))
        self._saved = snapshot

    def _work(self) -> None:
        slots = self.f._slots
        try:
            while not self.stop.is_set():
                if not slots.acquire(lambda: REGISTRY.rank(self.files.part), self.stop):
                    continue
                try:
                    with self.lock:
                        if not self._pending:
                            return
                        start, end = self._pending.popleft()
                    self._fetch_piece(start, end)
                finally:
                    slots.release()
        except BaseException as exc:  # noqa: BLE001 - handed to the coordinating thread
            with self.lock:
                if self.error is None:
                    self.error = exc
            self.stop.set()

    def _fetch_piece(self, start: int, end: int) -> None:
        req, retry = self.req, self.f.retry
        pos = start
        failures = 0
        out = _Coalescer(self._write)
        while pos < end and not self.stop.is_set():
            progressed = False
            speed = _LowSpeed(req.name, *self.f.low_speed)
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
                        if self.stop.is_set():
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
                if progressed and req.ranged and not isinstance(exc, _TooSlow):
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
                    self._restart_stream()
                    pos = start
                retry.sleep(retry.delay(failures, exc.retry_after), self.stop)

    def _restart_stream(self) -> None:
        """An origin without ranges cut the stream: start over from byte 0."""
        assert self.hasher is not None
        self.hasher.reset()
        with self.lock:
            self.landed = RangeSet()
        self.progress.restart()
        self._emit_started()

    def _write(self, pos: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        n = len(view)
        done = 0
        try:
            while done < n:
                done += os.pwrite(self.fd, view[done:], pos + done)
        except OSError as exc:
            raise _store_error(exc, self.files.dir) from exc
        assert self.hasher is not None
        self.hasher.offer(pos, view)
        with self.lock:
            self.landed.add(pos, pos + n)
            prefix = self.landed.prefix_end()
            for o in self.observers:
                o.landed(pos, pos + n)
        self.hasher.prefix(prefix)
        self.progress.advance(n)


class _TooSlow(TransientSourceError):
    """A response that brought bytes under the low-speed limit: dropped, and a failure."""


class _LowSpeed:
    """curl's ``--speed-limit``/``--speed-time`` for one response: fewer than ``limit``
    bytes/s, averaged over a window of ``window_s`` seconds, ends it. Checked as bytes
    arrive; an origin that sends nothing at all meets the read timeout instead."""

    def __init__(self, name: str, limit: int, window_s: float) -> None:
        self.name, self.limit, self.window_s = name, limit, window_s
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
            raise _TooSlow(
                f"{self.name}: the origin sent {self._bytes} bytes in {elapsed:.0f} s, under"
                f" the low-speed limit of {self.limit} bytes/s over {self.window_s:g} s"
                " (CACHEMESH_FETCH_LOW_SPEED_LIMIT, CACHEMESH_FETCH_LOW_SPEED_TIME)")
        self._start, self._bytes = time.monotonic(), 0


class _Slots:
    """The fetcher's connection slots, granted in order of rank, then of arrival.

    A semaphore lets a worker that just released a slot take it straight back,
    so one file's workers could keep every slot while another file (a shard
    index that a loader waits for) starves. Here waiters queue: the lowest rank
    first (``REGISTRY.rank``: watched objects in the order they were watched,
    then the rest), first come first served within a rank. A rank is looked up
    again whenever the queue's head is chosen, so a watch that begins while a
    transfer runs moves its next pieces forward.
    """

    def __init__(self, n: int) -> None:
        self._free = n
        self._cond = threading.Condition()
        self._waiting: list[tuple[Callable[[], int], int]] = []  # (rank of, ticket)
        self._tickets = itertools.count()

    def _head(self) -> tuple[Callable[[], int], int]:
        return min(self._waiting, key=lambda w: (w[0](), w[1]))

    def acquire(self, rank: Callable[[], int], stop: threading.Event) -> bool:
        """Wait for a slot; False if ``stop`` was set first."""
        with self._cond:
            me = (rank, next(self._tickets))
            self._waiting.append(me)
            try:
                while not (self._free > 0 and self._head() is me):
                    if stop.is_set():
                        return False
                    self._cond.wait(0.2)
                self._free -= 1
                return True
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()  # the head changed

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()


class _Coalescer:
    """Joins small reads into writes of up to COALESCE_BYTES.

    A TLS connection delivers at most one 16 KiB record per read; writing,
    hashing and recording each of them costs more CPU than the bytes do.
    Reads of COALESCE_BYTES / 4 or more are written as they come, and nothing
    waits here longer than REPORT_INTERVAL_S (a slow origin's bytes show up).
    """

    def __init__(self, write: Callable[[int, bytes | memoryview], None]) -> None:
        self._write = write
        self._buf = bytearray(COALESCE_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0
        self._fill = 0
        self._since = 0.0  # when the oldest byte held here arrived

    def add(self, pos: int, data: bytes) -> None:
        n = len(data)
        if self._fill and (self._start + self._fill != pos or self._fill + n > len(self._buf)):
            self.flush()
        if n >= len(self._buf) // 4:
            self.flush()
            self._write(pos, data)
            return
        if self._fill == 0:
            self._start = pos
            self._since = time.monotonic()
        self._view[self._fill:self._fill + n] = data
        self._fill += n
        if time.monotonic() - self._since >= REPORT_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._fill:
            fill, self._fill = self._fill, 0
            self._write(self._start, self._view[:fill])


def _tell(observer: FetchObserver, kind: str, value: object) -> None:
    if kind == "finished":
        observer.finished(value)  # type: ignore[arg-type]
    else:
        observer.failed(value)  # type: ignore[arg-type]


def _signature(path: Path) -> tuple[int, int] | None:
    """Which version of a record file is there (records are replaced by rename)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _store_error(exc: OSError, where: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(f"the disk under {where} is full")
    return StoreError(f"cannot write under {where}: {exc}")


def _keeps_partial(exc: BaseException, ranged: bool) -> bool:
    """Whether the bytes on disk are worth resuming after this failure."""
    if not ranged:
        return False  # nothing to resume: the origin can only stream from the start
    if isinstance(exc, (TransientSourceError, AccessDeniedError, KeyboardInterrupt)):
        return True  # the origin (or the user) may be back; the bytes are good
    # A full disk, a changed or vanished object, bad bytes: start afresh.
    return isinstance(exc, StoreError) and not isinstance(exc, CapacityError)
