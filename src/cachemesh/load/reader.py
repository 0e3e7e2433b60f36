"""Parallel positional reads of safetensors data into large buffers.

Each file's data section is read into one buffer in chunks of ``chunk_bytes``,
by a pool of threads calling ``os.preadv`` into memoryviews of that buffer
(``preadv`` releases the GIL while the kernel copies). Chunks are independent,
so any number can be in flight; the consumer waits on them in file order.

Where the bytes come from, per chunk (``direct_io=None``, the default): the
reader asks which pages of the chunk are in the page cache (``residency.py``),
reads runs of at least 1 MiB of absent pages with ``O_DIRECT`` straight into
the destination, and everything else (cached pages, and stray absent ones) with
ordinary reads that copy out of the page cache. Bypassing the
page cache for cold data was measured 1.3x faster than buffered reads on the
benchmark machine (parallel reads of a 2 GB file): the kernel neither
allocates page-cache pages nor copies out of them. A model server also has
better use for that memory than a second copy of the weights. Where the page
cache cannot be asked (a file the caller neither owns nor may write), every
read is an ordinary one.

``direct_io=False`` reads everything through the page cache (a later load of the
same file is then warm); ``direct_io=True`` reads everything directly. Where
``O_DIRECT`` is refused (tmpfs, some network file systems) the reader falls back
to ordinary reads by itself.

Buffer layout. Direct I/O needs file offset, length and memory address all
aligned to the block size, so a buffer holds the file from the aligned-down
data start: buffer byte 0 is file offset ``base``, a multiple of 4096, and a
tensor at file offset ``o`` sits at buffer position ``o - base``. Buffers are
page-aligned, so a tensor's address is aligned exactly as its file offset is.
A header whose length leaves the data section misaligned (never the official
writer's output) gets ``base`` = data start instead, keeping tensors aligned as
their relative offsets are, and is read without direct I/O.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from ..errors import LoadError
from .format import SafetensorsHeader
from .residency import Residency, open_residency

ALIGN = 4096
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def default_threads() -> int:
    # Cold reads want several requests in flight even on a small machine; warm
    # reads are memory copies and gain little beyond one thread per core.
    return min(16, max(4, 2 * (os.cpu_count() or 1)))


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class FileLayout:
    """Where one file's bytes go in its buffer."""

    header: SafetensorsHeader
    # File offset of buffer byte 0.
    base: int
    # Buffer length: room for every chunk, including a direct read's last block.
    size: int
    # Whether chunk starts are block-aligned, as O_DIRECT needs.
    direct_ok: bool

    @classmethod
    def for_header(cls, header: SafetensorsHeader) -> FileLayout:
        start, end = header.data_start, header.data_end
        if start % 8 == 0:
            base = start - start % ALIGN
            return cls(header, base, round_up(end, ALIGN) - base, True)
        return cls(header, start, round_up(end - start, ALIGN), False)


@dataclass(frozen=True)
class Chunk:
    """File offsets [start, end) of one read, in file number ``file``."""

    file: int
    start: int
    end: int


def chunk_step(chunk_bytes: int) -> int:
    """The chunk grid's step: ``chunk_bytes`` rounded up to whole blocks."""
    return round_up(max(chunk_bytes, ALIGN), ALIGN)


def plan_chunks(file: int, layout: FileLayout, chunk_bytes: int) -> list[Chunk]:
    """Chunks covering the file's tensor data, in file order, on a grid anchored at ``base``.

    For a block-aligned ``base`` every chunk starts on a block boundary and ends
    at most one step later, so reading it rounded up to whole blocks stays
    within the step (and within the buffer, whose size is rounded up too).
    """
    step = chunk_step(chunk_bytes)
    data_end = layout.header.data_end
    return [
        Chunk(file, start, min(start + step, data_end))
        for start in range(layout.base, data_end, step)
    ]


@dataclass
class ReadCounts:
    """Bytes of one or more chunks by where they came from."""

    page_cache: int = 0
    direct: int = 0
    buffered: int = 0

    def add(self, other: ReadCounts) -> None:
        self.page_cache += other.page_cache
        self.direct += other.direct
        self.buffered += other.buffered


# Runs of absent pages at least this long are read directly; shorter ones (a
# few pages evicted here and there from a warm file) are read through the page
# cache with the rest of the chunk, where the kernel's readahead batches them:
# one direct read per stray page was measured slower than that.
MIN_DIRECT_RUN = 1024 * 1024
_ABSENT_RUN = re.compile(b"\\x00{%d,}" % (MIN_DIRECT_RUN // ALIGN))


def _segments(start: int, end: int, cached: bytes) -> list[tuple[int, int, bool]]:
    """Split [start, end) into (begin, end, direct) pieces from a page residency vector.

    ``cached[i]`` is 1 when page ``i`` (counted from the page holding ``start``)
    is in the page cache. Direct pieces start and end on page boundaries,
    except that the last may end at ``end``.
    """
    first_page = start - start % ALIGN
    out: list[tuple[int, int, bool]] = []
    pos = start
    for run in _ABSENT_RUN.finditer(cached):
        begin = max(start, first_page + run.start() * ALIGN)
        stop = min(end, first_page + run.end() * ALIGN)
        if begin > pos:
            out.append((pos, begin, False))
        out.append((begin, stop, True))
        pos = stop
    if pos < end:
        out.append((pos, end, False))
    return out


class FileReader:
    """Open descriptors of one file and the policy to read chunks of it. Thread-safe."""

    def __init__(self, layout: FileLayout, direct_io: bool | None) -> None:
        self.layout = layout
        self.path = layout.header.path
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise LoadError(f"{self.path}: cannot open: {exc.strerror}") from exc
        self._direct_fd = -1
        self._residency: Residency | None = None
        if direct_io is not False and layout.direct_ok and _O_DIRECT:
            if direct_io is None:
                # Auto: direct only where the page cache can be asked first.
                self._residency = open_residency(self.path, self._fd)
            if direct_io or self._residency is not None:
                try:
                    self._direct_fd = os.open(self.path, os.O_RDONLY | _O_DIRECT)
                except OSError:
                    pass  # the file system refuses O_DIRECT: buffered it is
        self._direct = self._direct_fd >= 0

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1
        self._direct = False
        if self._residency is not None:
            self._residency.close()
            self._residency = None

    @property
    def direct(self) -> bool:
        """Whether bytes not in the page cache are read with O_DIRECT."""
        return self._direct

    def read(self, start: int, end: int, dst: memoryview) -> ReadCounts:
        """Fill ``dst`` with file bytes [start, end); ``dst[0]`` is file offset ``start``.

        ``dst`` must extend to the block boundary after ``end`` when direct reads are on.
        """
        counts = ReadCounts()
        cached: bytes | None = None
        if not self._direct:
            segments = [(start, end, False)]
        elif self._residency is None:
            segments = [(start, end, True)]  # direct_io=True
        else:
            cached = self._residency.pages(start, end)
            segments = [(start, end, False)] if cached is None else _segments(start, end, cached)
        first_page = start - start % ALIGN
        for seg_start, seg_end, direct in segments:
            pos = seg_start
            if direct and self._direct:
                pos = self._read_direct(pos, start, seg_end, dst)
                counts.direct += pos - seg_start
            if pos < seg_end:
                self._read_buffered(pos, start, seg_end, dst)
                in_cache = 0
                if cached is not None:
                    first = (pos - first_page) // ALIGN
                    last = -(-(seg_end - first_page) // ALIGN)
                    in_cache = min(seg_end - pos, cached.count(1, first, last) * ALIGN)
                counts.page_cache += in_cache
                counts.buffered += seg_end - pos - in_cache
        return counts

    def _read_direct(self, pos: int, start: int, end: int, dst: memoryview) -> int:
        """Read [pos, end) with O_DIRECT; returns how far it got (``end`` unless it had to stop)."""
        stop = round_up(end, ALIGN)
        while pos < end:
            try:
                n = os.preadv(self._direct_fd, [dst[pos - start : stop - start]], pos)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    # Alignment stricter than 4 KiB, or no O_DIRECT after all. The
                    # descriptor stays open until close(): another thread may be using it.
                    self._direct = False
                    return pos
                raise self._error(pos, exc) from exc
            if n <= 0:
                raise self._truncated(pos, end)
            pos += n
            if pos % ALIGN and pos < end:
                self._direct = False  # a short, unaligned read: the rest goes buffered
                return pos
        return min(pos, end)

    def _read_buffered(self, pos: int, start: int, end: int, dst: memoryview) -> None:
        while pos < end:
            try:
                n = os.preadv(self._fd, [dst[pos - start : end - start]], pos)
            except OSError as exc:
                raise self._error(pos, exc) from exc
            if n <= 0:
                raise self._truncated(pos, end)
            pos += n

    def _error(self, pos: int, exc: OSError) -> LoadError:
        return LoadError(f"{self.path}: read failed at byte {pos}: {exc.strerror or exc}")

    def _truncated(self, pos: int, end: int) -> LoadError:
        return LoadError(
            f"{self.path}: file is truncated: end of file at byte {pos}, "
            f"tensor data runs to byte {end}"
        )
