"""Read a checkpoint ahead of its load, into the buffers its load will use.

A server knows which models it may load before their first request comes. A
:class:`Prefetch` starts the reads of one checkpoint at once, exactly as a
:class:`~cachemesh.load.stream.TensorStream` would (the same chunks, the same
readers: page cache where the pages are there, ``O_DIRECT`` where they are
not, one host buffer per file), but without torch: it starts while the process
is still importing torch. The first CPU stream of the same checkpoint in this
process then adopts it (:func:`take`): the buffers, the reads in flight and
those done, so the load is a hand-over instead of a second read.

Why not the page cache (``posix_fadvise(WILLNEED)``, which the worker did
before): the kernel caps one WILLNEED at the device's read-ahead size (8 MiB),
and a page-cache copy costs the memory twice and one more copy. On the
benchmark VM, where memory the guest has not touched lately is slow to touch,
reading 2 GB into the page cache first made the load 2 s slower, not faster.

Memory. The buffers are anonymous memory of this process from the start: the
caller decides whether that is allowed (the server prefetches only when every
declared model fits its memory budget). :meth:`Prefetch.resident_bytes` says
how much of them is resident, so a caller measuring a load by RSS can count
what was read ahead as the load's. A prefetch nobody takes is dropped after
``ttl_s`` (its reads cancelled, its memory returned).
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from . import memory
from .checkpoint import Checkpoint, read_checkpoint
from .reader import (
    DEFAULT_CHUNK_BYTES,
    Chunk,
    FileLayout,
    FileReader,
    ReadCounts,
    default_threads,
    plan_chunks,
)
from .residency import _load_libc

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
DEFAULT_TTL_S = 300.0


def _identity(checkpoint: Checkpoint) -> tuple:
    return tuple((str(h.path), h.data_start, h.data_end) for h in checkpoint.headers)


class Prefetch:
    """The reads of one checkpoint into host buffers, started on construction.

    Its threads take the chunks in file order; :meth:`adopt` adds threads when a
    load waits on the reads.
    """

    def __init__(self, checkpoint: Checkpoint, *, threads: int | None = None,
                 chunk_bytes: int | None = None, direct_io: bool | None = None) -> None:
        self.checkpoint = checkpoint
        self.layouts = [FileLayout.for_header(h) for h in checkpoint.headers]
        self.buffers: list = []
        self.readers: list[FileReader] = []
        self.pending: list[tuple[Chunk, Future[ReadCounts]]] = []
        self.taken = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []
        try:
            self.buffers = [memory.allocate(layout.size) for layout in self.layouts]
            self._views = [memoryview(b) for b in self.buffers]
            self.readers = [FileReader(layout, direct_io) for layout in self.layouts]
            for i, layout in enumerate(self.layouts):
                for chunk in plan_chunks(i, layout, chunk_bytes or DEFAULT_CHUNK_BYTES):
                    self.pending.append((chunk, Future()))
            self._grow(threads or default_threads())
        except BaseException:
            self.close()
            raise

    def _grow(self, n: int) -> None:
        with self._lock:
            while len(self._threads) < n and not self._stopped:
                t = threading.Thread(target=self._run, name="cachemesh-prefetch", daemon=True)
                self._threads.append(t)
                t.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped or self._next >= len(self.pending):
                    return
                chunk, future = self.pending[self._next]
                self._next += 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._read(chunk))
            except BaseException as exc:  # noqa: BLE001 - the consumer raises it
                future.set_exception(exc)

    def _read(self, chunk: Chunk) -> ReadCounts:
        base = self.layouts[chunk.file].base
        return self.readers[chunk.file].read(
            chunk.start, chunk.end, self._views[chunk.file][chunk.start - base:])

    def adopt(self, threads: int | None = None) -> None:
        """A load waits on these reads now: at least ``threads`` threads."""
        self._grow(threads or default_threads())

    def resident_bytes(self) -> int:
        """How much of the buffers is in memory now (``mincore``; 0 where it cannot tell)."""
        libc = _load_libc()
        if libc is None:
            return 0
        total = 0
        for buf in self.buffers:
            try:
                ref = ctypes.c_char.from_buffer(buf)
            except (TypeError, ValueError, BufferError):
                continue
            address = ctypes.addressof(ref)
            del ref  # the export would keep the mapping from closing
            vec = ctypes.create_string_buffer(-(-len(buf) // PAGE))
            if libc.mincore(ctypes.c_void_p(address), len(buf), vec) == 0:
                total += sum(b & 1 for b in vec.raw) * PAGE
        return total

    def stop(self) -> None:
        """Cancel the reads not started and wait for those running."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._stopped = True
        for _, future in self.pending:
            future.cancel()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def close(self) -> None:
        """Stop reading and drop the buffers (unless a stream took them)."""
        self.stop()
        if self.taken:
            return
        for reader in self.readers:
            reader.close()
        self.pending, self.readers, self._views = [], [], []
        for buf in self.buffers:
            try:
                buf.close()
            except BufferError:
                pass  # a view still exists somewhere; the mapping goes with it
        self.buffers = []


_lock = threading.Lock()
_waiting: dict[tuple, Prefetch] = {}


def start(path: str | os.PathLike[str], *, ttl_s: float = DEFAULT_TTL_S,
          threads: int | None = None) -> Prefetch | None:
    """Start reading the safetensors checkpoint in ``path`` (a directory or file)
    for a later load in this process; None when it has none, or is being read."""
    try:
        checkpoint = read_checkpoint(Path(path))
    except Exception:  # noqa: BLE001 - not a safetensors checkpoint: nothing to do
        return None
    key = _identity(checkpoint)
    with _lock:
        if key in _waiting:
            return None
        prefetch = Prefetch(checkpoint, threads=threads)
        _waiting[key] = prefetch
    timer = threading.Timer(ttl_s, _expire, (key, prefetch))
    timer.daemon = True
    prefetch._timer = timer
    timer.start()
    return prefetch


def _expire(key: tuple, prefetch: Prefetch) -> None:
    with _lock:
        if _waiting.get(key) is not prefetch:
            return
        del _waiting[key]
    prefetch.close()


def take(checkpoint: Checkpoint) -> Prefetch | None:
    """The prefetch of this checkpoint, handed over to the caller (once), or None."""
    with _lock:
        prefetch = _waiting.pop(_identity(checkpoint), None)
        if prefetch is not None:
            if prefetch._timer is not None:
                prefetch._timer.cancel()
            prefetch.taken = True
    return prefetch


def waiting() -> list[Prefetch]:
    """The prefetches not taken yet."""
    with _lock:
        return list(_waiting.values())


def discard_all() -> None:
    with _lock:
        left = list(_waiting.values())
        _waiting.clear()
    for prefetch in left:
        prefetch.close()
