"""One attempt at moving one object's missing bytes into its partial file, and committing it.

::

    open tmp/fetch/KEY.part (resume if its record matches, else start it afresh)
          │
          ▼
    missing ranges ──split──▶ pieces ──▶ worker threads, each holding one of the
          │                  fetcher's connection slots (slots.py) while a *read*
          │                  puts a piece's bytes into the partial (reads.py: the
          │                  origin's); every write is pwrite-n at its offset, fed to
          │                  the hasher (hashing.py) and told to observers (observe.py)
          │                  every checkpoint interval: fdatasync, then the record
          ▼
    digests checked against what the origin publishes ── mismatch: CorruptTransfer
          │
          ▼
    blobs.commit (fsync, 0444, link into blobs/sha256/, row), then the record "blob X"

Workers take their work from :meth:`Transfer.next_task`: a byte range and the read
that fetches it. The plain transfer reads every range from the origin; a peer-first
transfer (``swarm.py``) overrides the choice.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import (
    AccessDeniedError,
    CapacityError,
    IntegrityError,
    StoreError,
    TransientSourceError,
)
from ..store.blobs import BlobRef
from ..store.locks import private_dirs
from .hashing import PrefixHasher
from .observe import REGISTRY, FetchObserver
from .ranges import PartialFiles, PartialState, RangeSet, split
from .reads import OriginRead

if TYPE_CHECKING:
    from .fetcher import Fetcher, FetchRequest
    from .progress import Progress

# A watched fetch (observe.py) starts with a piece this long; pieces double up to chunk_size.
WATCHED_FIRST_PIECE = 256 * 1024

# How messages name each digest kind.
_DIGEST_NAMES = {"git-sha1": "git blob id", "md5": "MD5"}

#: ``read(start, end, sink, stop)``: puts bytes ``[start, end)`` into the sink (reads.py).
Read = Callable[[int, int, "Transfer", threading.Event], None]


class CorruptTransfer(IntegrityError):
    """The fetched bytes do not match the origin's checksum (fetched again once)."""


class Transfer:
    """One attempt at one object (see the module docstring)."""

    def __init__(
        self,
        fetcher: Fetcher,
        request: FetchRequest,
        files: PartialFiles,
        progress: Progress,
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
        self.origin = OriginRead(request, fetcher.retry, fetcher.low_speed)
        self.checkpoint_s = fetcher.checkpoint_s
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

    def emit_started(self) -> None:
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
            raise store_error(exc, self.files.dir) from exc
        try:
            self.progress.restart()
            self.progress.advance(self.landed.total())
            published = req.published
            self.hasher = PrefixHasher(self.fd, req.size, mode=self.f.hash_mode,
                                       also=[k for k in published if k != "sha256"])
            self.hasher.prefix(self.landed.prefix_end())
            self.emit_started()
            self.plan()
            try:
                self._run_workers()
            finally:
                self.progress.flush()
            digests = self.digests()
            sha = digests["sha256"]
            for kind, expected in published.items():
                if digests[kind] != expected:
                    label = _DIGEST_NAMES.get(kind, kind)
                    claim = (f"the origin publishes {expected}" if req.digests_from is None
                             else f"not the {expected} given with {req.digests_from}")
                    raise CorruptTransfer(f"{req.name}: the fetched bytes have {label}"
                                          f" {digests[kind]}, {claim}")
        except BaseException as exc:
            if self.hasher is not None:
                self.hasher.close()
            self.close_fd()
            if not _keeps_partial(exc, req.ranged):
                self.files.discard()
            raise
        self.close_fd()
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

    def plan(self) -> None:
        """Queue the missing ranges (called once the partial is open)."""
        gaps = list(self.landed.gaps(self.req.size))
        # Someone reads this object while it lands (a streaming loader): its head first.
        ramp = WATCHED_FIRST_PIECE if self.observers else 0
        self._pending.extend(split(gaps, self.f.chunk_size, ramp) if self.req.ranged else gaps)

    def next_task(self) -> tuple[int, int, Read] | None:
        """The next range to fetch and the read that fetches it; None when none is left."""
        with self.lock:
            if not self._pending:
                return None
            start, end = self._pending.popleft()
        return start, end, self.origin

    def workers(self) -> int:
        return min(self.f.concurrency, len(self._pending))

    def digests(self) -> dict[str, str]:
        """The object's digests once every byte landed (the hasher's result)."""
        assert self.hasher is not None
        return self.hasher.finish()

    def close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _run_workers(self) -> None:
        n = self.workers()
        threads = [threading.Thread(target=self._work, name=f"cachemesh-fetch-{i}", daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        try:
            next_checkpoint = time.monotonic() + self.checkpoint_s
            for t in threads:
                while t.is_alive():
                    t.join(max(0.0, next_checkpoint - time.monotonic()))
                    if time.monotonic() >= next_checkpoint:
                        if self.req.ranged and self.error is None:
                            self.checkpoint()
                        next_checkpoint = time.monotonic() + self.checkpoint_s
        except BaseException:
            self.stop.set()
            for t in threads:
                t.join()
            raise
        finally:
            if self.req.ranged and (self.error is not None or self.stop.is_set()):
                # Keep what landed for the next attempt, whatever stopped us.
                try:
                    self.checkpoint()
                except OSError:
                    pass
        if self.error is not None:
            raise self.error
        if not self.landed.covers(0, self.req.size):
            raise AssertionError(f"{self.req.name}: workers finished with gaps {self.landed!r}")

    def checkpoint(self, *, force: bool = False) -> None:
        with self.lock:
            snapshot = self.landed.copy()
        if snapshot == self._saved and not force:
            return
        os.fdatasync(self.fd)  # the bytes first, then the record that names them
        self.files.write_state(PartialState(self.req.size, snapshot, object=self.req.name))
        self._saved = snapshot

    def _work(self) -> None:
        slots = self.f.slots
        try:
            while not self.stop.is_set():
                # The task first: waiting for one (a swarm waits for pieces to appear)
                # holds no slot that another object's reads could use.
                task = self.next_task()
                if task is None:
                    return
                if not slots.acquire(lambda: REGISTRY.rank(self.files.part), self.stop):
                    return  # stopping
                try:
                    start, end, read = task
                    read(start, end, self, self.stop)
                finally:
                    slots.release()
        except BaseException as exc:  # noqa: BLE001 - handed to the coordinating thread
            with self.lock:
                if self.error is None:
                    self.error = exc
            self.stop.set()

    # -- the sink of every read ----------------------------------------------------------

    def restart(self) -> None:
        """An origin without ranges cut the stream: start over from byte 0."""
        assert self.hasher is not None
        self.hasher.reset()
        with self.lock:
            self.landed = RangeSet()
        self.progress.restart()
        self.emit_started()

    def write(self, pos: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        n = len(view)
        done = 0
        try:
            while done < n:
                done += os.pwrite(self.fd, view[done:], pos + done)
        except OSError as exc:
            raise store_error(exc, self.files.dir) from exc
        assert self.hasher is not None
        self.hasher.offer(pos, view)
        with self.lock:
            self.landed.add(pos, pos + n)
            for o in self.observers:
                o.landed(pos, pos + n)
            # Under the lock: a swarm that takes bad bytes out of ``landed`` (swarm.py)
            # must not see an older, longer prefix told to the hasher after it.
            self.hasher.prefix(self.landed.prefix_end())
        self.progress.advance(n)


def _tell(observer: FetchObserver, kind: str, value: object) -> None:
    if kind == "finished":
        observer.finished(value)  # type: ignore[arg-type]
    else:
        observer.failed(value)  # type: ignore[arg-type]


def _size_of(path: os.PathLike[str] | str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def store_error(exc: OSError, where: os.PathLike[str] | str) -> Exception:
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
