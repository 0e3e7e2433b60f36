"""Stream tensors out as their bytes land: :class:`TensorStream` and its CUDA path.

Reading starts when the stream is created: every chunk of every file is queued
on a thread pool at once (see ``reader.py``), so a consumer that is busy
elsewhere (building a model on the meta device, say) overlaps with the I/O.
The consumer waits on chunks in file order; once chunks up to file offset ``o``
have landed, every tensor of that file ending at or before ``o`` is handed out.
Chunks finish roughly in order, so tensors flow out while later chunks are
still being read.

Where the bytes land depends on ``device``:

- CPU: one host buffer per file (``memory.py``); each tensor is a
  ``torch.frombuffer`` view of it with a storage of its own, so no tensor byte
  is copied after the read (misaligned tensors excepted: ``LoadStats.copied``).
- CUDA: one device buffer per file, and a few pinned, page-aligned host staging
  buffers of one chunk each. A reading thread takes a free staging buffer,
  waits on the event of the copy that last used it, reads a chunk into it,
  enqueues an asynchronous host-to-device copy on a dedicated copy stream and
  records an event. The consumer makes its current stream wait on that event
  before it hands out tensors of the chunk, so they are safe to use on the
  consumer's stream without a host-side synchronisation. Tensors are views of
  the file's device buffer.
- anything else: the CPU path, then ``.to(device)`` tensor by tensor.
"""

from __future__ import annotations

import hashlib
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Protocol

import torch

from ..errors import LoadError
from . import integrity, memory
from .checkpoint import Checkpoint
from .format import SafetensorsHeader, TensorInfo
from .reader import (
    ALIGN,
    DEFAULT_CHUNK_BYTES,
    Chunk,
    FileLayout,
    FileReader,
    ReadCounts,
    chunk_step,
    default_threads,
    plan_chunks,
)
from .stats import LoadStats
from .tensors import CASTABLE, resolve_dtype, torch_dtype, torch_shape


class ChunkReader(Protocol):
    """What the stream reads chunks with: a :class:`FileReader`, or a stand-in."""

    def read(self, start: int, end: int, dst: memoryview) -> ReadCounts: ...

    def close(self) -> None: ...


class _HostSink:
    """Chunks land directly in one anonymous mapping per file."""

    def __init__(self, layouts: list[FileLayout], buffers: list[Any] | None = None) -> None:
        self.layouts = layouts
        self.buffers = buffers or [memory.allocate(layout.size) for layout in layouts]
        self.views = [memoryview(b) for b in self.buffers]

    def read_chunk(self, reader: ChunkReader, chunk: Chunk) -> ReadCounts:
        base = self.layouts[chunk.file].base
        return reader.read(chunk.start, chunk.end, self.views[chunk.file][chunk.start - base :])

    def landed(self, chunk: Chunk) -> None:
        pass

    def tensor(self, file: int, info: TensorInfo, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        pos = info.start - self.layouts[file].base
        raw = torch.frombuffer(self.buffers[file], dtype=torch.uint8, count=info.nbytes, offset=pos)
        # The buffer is page-aligned, so the address is aligned as `pos` is.
        if pos % dtype.itemsize:
            return raw.clone().view(dtype), True
        return raw.view(dtype), False

    def close(self) -> None:
        # Tensors hold their own exports of the mappings; drop ours.
        self.views, self.buffers = [], []


class _Digest:
    """The sha256 of one file, fed its chunks in file order as they land (integrity.py).

    The reads cover the file from ``layout.base``; the bytes before it (the header)
    and after the last tensor are read from the file here."""

    def __init__(self, verifier: Any, expected: Any, header: SafetensorsHeader,
                 layout: FileLayout) -> None:
        self.verifier, self.expected, self.path = verifier, expected, header.path
        self.base, self.data_end = layout.base, header.data_end
        self.hash = hashlib.sha256()
        self.pos = 0
        self.done = False
        self._update_from_file(layout.base)

    def _update_from_file(self, end: int | None) -> None:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.pos)
            while end is None or self.pos < end:
                block = f.read(min(4 * 1024 * 1024, end - self.pos) if end is not None
                               else 4 * 1024 * 1024)
                if not block:
                    break
                self.hash.update(block)
                self.pos += len(block)

    def feed(self, view: memoryview, chunk: Chunk) -> None:
        end = min(chunk.end, self.data_end)
        if chunk.start != self.pos or end <= self.pos:
            return
        self.hash.update(view[chunk.start - self.base:end - self.base])
        self.pos = end
        if end >= self.data_end:
            self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self._update_from_file(None)  # what follows the tensors, to the end of the file
            self.verifier.done(self.path, self.expected, self.hash.hexdigest())


class _StagingSlot:
    """One pinned host buffer of one chunk, and the event of the copy that last read it."""

    def __init__(self, nbytes: int) -> None:
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if pinned.data_ptr() % ALIGN:
            # Direct reads need a block-aligned address; pinned blocks normally are.
            pinned = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
            skip = -pinned.data_ptr() % ALIGN
            pinned = pinned[skip : skip + nbytes]
        self.tensor = pinned
        self.view = memoryview(pinned.numpy())
        self.event: torch.cuda.Event | None = None


class _CudaSink:
    """Chunks are read into pinned staging buffers and copied to one device buffer per file."""

    def __init__(
        self, layouts: list[FileLayout], device: torch.device, chunk_bytes: int, slots: int
    ) -> None:
        self.layouts = layouts
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        # Allocated on the consumer's current stream, which waits on every copy
        # before it sees a tensor, so the allocator's stream bookkeeping holds.
        self.buffers = [
            torch.empty(layout.size, dtype=torch.uint8, device=device) for layout in layouts
        ]
        # Chunks start block-aligned and span at most one step, so a direct read
        # rounded up to the next block still fits in one step.
        slot_bytes = chunk_step(chunk_bytes)
        self.free: queue.SimpleQueue[_StagingSlot] = queue.SimpleQueue()
        for _ in range(slots):
            self.free.put(_StagingSlot(slot_bytes))
        self.copied: dict[Chunk, torch.cuda.Event] = {}

    def read_chunk(self, reader: ChunkReader, chunk: Chunk) -> ReadCounts:
        slot = self.free.get()
        try:
            if slot.event is not None:
                slot.event.synchronize()  # its previous copy must be done before we overwrite it
            counts = reader.read(chunk.start, chunk.end, slot.view)
            base = self.layouts[chunk.file].base
            n = chunk.end - chunk.start
            with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
                dst = self.buffers[chunk.file][chunk.start - base : chunk.end - base]
                dst.copy_(slot.tensor[:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            slot.event = event
            self.copied[chunk] = event
        finally:
            self.free.put(slot)
        return counts

    def landed(self, chunk: Chunk) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.copied.pop(chunk))

    def tensor(self, file: int, info: TensorInfo, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        pos = info.start - self.layouts[file].base
        raw = self.buffers[file][pos : pos + info.nbytes]
        # Device buffers are at least 256-byte aligned: alignment follows `pos`.
        if pos % dtype.itemsize:
            return raw.clone().view(dtype), True
        return raw.view(dtype), False

    def close(self) -> None:
        # Nothing may still be copying out of the staging buffers or into a
        # device buffer the caller is about to drop.
        self.copy_stream.synchronize()
        self.buffers = []
        self.copied.clear()
        while True:
            try:
                self.free.get_nowait()
            except queue.Empty:
                break


def _resolve_device(device: torch.device | str | int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class TensorStream(Iterator[tuple[str, torch.Tensor]]):
    """An iterator of ``(name, tensor)`` in file order, yielded as each tensor lands.

    Reading starts on construction. Use it as a context manager, or call
    :meth:`close`, to stop early: pending reads are cancelled and running ones
    waited for. ``stats`` is complete once the iterator is exhausted.

    ``open_reader`` replaces the :class:`FileReader` of each file (the origin
    stream's readers wait for bytes to land before they read them). A host
    stream with the default reading options adopts a :mod:`prefetch` of the same
    checkpoint started earlier in this process, if there is one.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: torch.device | str | int = "cpu",
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
        chunk_bytes: int | None = None,
        direct_io: bool | None = None,
        open_reader: Callable[[FileLayout], ChunkReader] | None = None,
    ) -> None:
        self._t0 = time.perf_counter()
        self.checkpoint = checkpoint
        self.stats = LoadStats(files=len(checkpoint.headers))
        self._cast = resolve_dtype(dtype)
        self._device = _resolve_device(device)
        explicit = chunk_bytes is not None or direct_io is not None
        threads = threads or default_threads()
        if threads < 1:
            raise LoadError(f"threads must be at least 1, got {threads}")
        chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
        self._ready: deque[tuple[str, torch.Tensor]] = deque()
        self._file = 0
        self._next_tensor = 0
        self._closed = False
        self._readers: list[ChunkReader] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Chunk, Future[ReadCounts]]] = deque()
        self._sink: Any = None
        self._ahead: Any = None  # an adopted prefetch, whose threads do the reads
        self._digests: list[_Digest | None] = []  # files a verified load hashes
        try:
            layouts = [FileLayout.for_header(h) for h in checkpoint.headers]
            # Fail on a dtype torch lacks before reading anything.
            self._dtypes = [[torch_dtype(h, t) for t in h.tensors] for h in checkpoint.headers]
            self._shapes = [[torch_shape(h, t) for t in h.tensors] for h in checkpoint.headers]
            ahead = None
            if self._device.type != "cuda" and open_reader is None and not explicit:
                from . import prefetch

                ahead = prefetch.take(checkpoint)
            if ahead is not None:
                # Read ahead into the buffers this stream would have used: adopt them,
                # with the reads done and those in flight.
                ahead.adopt(threads)
                self._ahead = ahead
                self._sink = _HostSink(ahead.layouts, ahead.buffers)
                self._readers = list(ahead.readers)
                self._pending = deque(ahead.pending)
                self.stats.prefetched = True
                self._claim_digests(ahead.layouts)
                return
            if self._device.type == "cuda":
                self._sink = _CudaSink(layouts, self._device, chunk_bytes, slots=threads + 2)
            else:
                self._sink = _HostSink(layouts)
                if open_reader is None:
                    self._claim_digests(layouts)
            if open_reader is None:
                self._readers = [FileReader(layout, direct_io) for layout in layouts]
            else:
                self._readers = [open_reader(layout) for layout in layouts]
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cachemesh-load")
            for i, layout in enumerate(layouts):
                for chunk in plan_chunks(i, layout, chunk_bytes):
                    future = self._pool.submit(self._sink.read_chunk, self._readers[i], chunk)
                    self._pending.append((chunk, future))
        except BaseException:
            self.close()
            raise

    def _claim_digests(self, layouts: list[FileLayout]) -> None:
        """Files that the load being verified (integrity.py) wants hashed, on the host
        path: there the bytes stay in their buffer after they land."""
        for header, layout in zip(self.checkpoint.headers, layouts, strict=True):
            claimed = integrity.claim(header.path)
            self._digests.append(None if claimed is None else _Digest(*claimed, header, layout))

    def _digest(self, file: int, chunk: Chunk | None) -> None:
        digest = self._digests[file] if file < len(self._digests) else None
        if digest is None:
            return
        if chunk is None:
            digest.finish()
        else:
            digest.feed(self._sink.views[file], chunk)

    def __iter__(self) -> TensorStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        try:
            while not self._ready:
                if self._closed or self._file >= len(self.checkpoint.headers):
                    self.close()
                    raise StopIteration
                if self._pending and self._pending[0][0].file == self._file:
                    chunk, future = self._pending.popleft()
                    self._count(future.result())
                    self._sink.landed(chunk)
                    self._digest(chunk.file, chunk)  # before its tensors are handed out
                    self._hand_out(chunk.end)
                else:
                    self._digest(self._file, None)
                    self._hand_out(None)  # the file's reads are all in: the rest of it
                    self._file += 1
                    self._next_tensor = 0
            return self._ready.popleft()
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def _count(self, counts: ReadCounts) -> None:
        self.stats.page_cache_bytes += counts.page_cache
        self.stats.direct_bytes += counts.direct
        self.stats.buffered_bytes += counts.buffered

    def _hand_out(self, landed_to: int | None) -> None:
        header: SafetensorsHeader = self.checkpoint.headers[self._file]
        tensors = header.tensors
        while self._next_tensor < len(tensors):
            i = self._next_tensor
            info = tensors[i]
            if landed_to is not None and info.end > landed_to:
                break
            self._ready.append((info.name, self._make(header, i, info)))
            self._next_tensor += 1
        self.stats.seconds = time.perf_counter() - self._t0

    def _make(self, header: SafetensorsHeader, i: int, info: TensorInfo) -> torch.Tensor:
        dtype, shape = self._dtypes[self._file][i], self._shapes[self._file][i]
        if info.nbytes == 0:
            tensor = torch.empty(shape, dtype=dtype, device=self._sink_device())
        else:
            tensor, copied = self._sink.tensor(self._file, info, dtype)
            tensor = tensor.view(shape)
            if copied:
                self.stats.copied_names.append(info.name)
        if self._device.type not in ("cpu", "cuda"):
            tensor = tensor.to(self._device)
        if self._cast is not None and tensor.dtype in CASTABLE and tensor.dtype != self._cast:
            tensor = tensor.to(self._cast)
            self.stats.cast += 1
        self.stats.tensors += 1
        self.stats.tensor_bytes += info.nbytes
        return tensor

    def _sink_device(self) -> torch.device:
        return self._device if self._device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        """Stop reading and release the descriptors, threads and staging memory."""
        if self._closed:
            return
        self._closed = True
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ahead is not None:
            self._ahead.stop()
        for reader in self._readers:
            reader.close()
        if self._sink is not None:
            self._sink.close()

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
