"""Tensors straight from the origin while the cache fetches them: one read serves both.

``iter_tensors("s3://bucket/model")`` (or ``hf://``, ``https://``, …) for a
source that is not cached yet does not pull first and load after. It starts
the pull in a thread and reads the bytes the fetcher writes into its partial
files as they land (found through ``fetch.Landing``), so the first tensors come while
the rest is still on the wire, and the origin serves every byte once::

    caller's thread                          pull thread (Caches.ensure, first=[index, shards])
    ---------------                          -----------------------------------------------
    list the source; watch the partial of    list, plan, fetch: the fetcher writes each file's
    the shard index and each *.safetensors   ranges in file order into its partial; tells the
                                             Flight of every landed range (fetch/observe.py)
    index: wait for all of it, parse
    shard: wait [0, 8), then the header,     ──▶ landed(start, end) wakes the waiting reader
           parse; a TensorStream whose
           readers wait for each chunk's
           range, then pread it from the
           partial (page cache, no 2nd GET)
    ...yield tensors in file order...        verify sha256/size, commit the blob (same inode)
    last tensor out: join the pull           cache Available (or Failed: nothing visible)
    check every byte read came from the inode that is now the verified blob

What a caller may rely on (the same outcome as pulling first, only earlier):

- Tensors are yielded **before their bytes are verified**. The stream ends
  (``StopIteration``) only after the whole pull succeeded, every file was
  verified and committed, and every byte the stream read is known to be part
  of a verified blob. If the pull fails (corrupt bytes, a checksum mismatch
  found at the end, a dead origin), the stream raises the pull's error, with a
  note that the tensors already yielded came from unverified bytes and must be
  discarded. Nothing half-written becomes visible: that is the fetcher's rule
  (``fetch/fetcher.py``), which streaming does not change.
- If a file's bytes failed verification and the fetcher fetched it again while
  the stream was reading it: before any tensor of the file was handed out (a
  header that does not parse, say), the stream waits for the pull and reads
  the file from its verified bytes, and nobody notices but the clock; after,
  the stream raises :class:`RefetchedError` (a :class:`LoadError`) once the
  pull is over: tensors yielded from that file may be wrong.
  ``load_state_dict`` handles that by loading again from the now verified
  cache; it returns only after verification passed, so a dict it returns
  never holds unverified bytes.
- Breaking out of the stream (``close()``) leaves the pull running in its
  thread: the cache still fills, and the next load reads it.
- Another process already fetching the same object (single-flight): this
  process's pull waits on that fetch instead of fetching twice, and the
  stream follows the other process's progress through its record (written
  every second, bytes made durable first), read through the fetcher's public
  ``fetch.Landing``, and reads the ranges it names from the same partial file.

Which files are streamed: those ``read_checkpoint`` would pick in the cache's
view (the top level: the shard index and the shards it names, in order; else
every ``*.safetensors`` by name). A source with none of them, a cache that is
already Available, or an origin that is not remote goes the ordinary way:
pull, then read the view.

Rejected: a second ranged GET per tensor beside the fetcher's (twice the origin
traffic, and the loader would see bytes nobody verifies), and reading from
the fetcher's memory (the fetcher keeps none; the page cache already holds
every byte it just wrote, which a ``pread`` copies out).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoadError, RefetchedError
from .checkpoint import INDEX_NAME, Checkpoint, parse_index
from .format import SafetensorsHeader, check_header_size, parse_header
from .reader import ReadCounts
from .stats import LoadStats
from .stream import TensorStream

if TYPE_CHECKING:
    from ..caches import Caches, CacheSpec
    from ..fetch import Flight, LandingSpot
    from ..sources import RemoteFile, RemoteSource

# How often a reader waiting for bytes looks beyond this process's fetch: the
# pull's outcome, a blob that was already there, another process's record.
POLL_S = 0.05
# One read of the stream when the caller names no chunk size: small, so that a
# tensor is handed out soon after its bytes land, not after a 16 MiB chunk.
STREAM_CHUNK_BYTES = 1024 * 1024


class _Replaced(Exception):
    """Internal: the partial being read was discarded or rewritten (or its fetch failed)."""


class _Pull:
    """``Caches.ensure`` in a thread; its outcome for whoever waits."""

    def __init__(self, caches: Caches, spec: CacheSpec, first: list[str]) -> None:
        self.error: BaseException | None = None
        self.view: Path | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(caches, spec, first), name="cachemesh-stream-pull",
            daemon=True,  # a closed stream leaves the pull to finish; exit may cut it (resumable)
        )
        self._thread.start()

    def _run(self, caches: Caches, spec: CacheSpec, first: list[str]) -> None:
        try:
            self.view = caches.ensure(spec, first=first).view
        except BaseException as exc:  # noqa: BLE001 - handed to the stream
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Path:
        """The view once the pull succeeded; raises its error otherwise."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        assert self.view is not None
        return self.view


class _Feed:
    """Where the bytes of one file of the source can be read, as soon as they can.

    ``wait(start, end)`` returns a path whose bytes ``[start, end)`` are this
    file's: the fetcher's partial while this process fetches it (its Flight),
    the partial another process fetches (its record), the blob (verified, or
    already there), or the file in the view once the pull is over.
    """

    def __init__(self, file: RemoteFile, final: Path, flight: Flight, spot: LandingSpot,
                 blob_path: Callable[[str], Path], pull: _Pull,
                 cancelled: threading.Event) -> None:
        self.file = file
        self.final = final  # the file in the cache's view, once the pull is done
        self.flight = flight
        self.spot = spot  # where another process's fetch of the file lands (fetch/landing.py)
        self.blob_path = blob_path  # sha256 -> where that blob lives
        self.blob = blob_path(file.sha256) if file.sha256 else None  # the published one's
        self.pull = pull
        self.cancelled = cancelled

    def wait_verified(self) -> Path:
        """A path of the file's verified bytes (a blob, or the view): for small files that
        are read whole before anything else (the shard index)."""
        size = self.file.size
        while True:
            if self.cancelled.is_set():
                raise LoadError(f"{self.final}: the stream was closed")
            if self.flight.blob is not None:
                return self.flight.blob
            if self.pull.done:
                self.pull.wait()
                return self.final
            if self.flight.partial is None:
                if self.blob is not None and _size_of(self.blob) == size:
                    return self.blob
                landed = self.spot.read()
                if landed is not None and landed.sha256 is not None and landed.size == size:
                    blob = self.blob_path(landed.sha256)
                    if _size_of(blob) == size:
                        return blob
            time.sleep(POLL_S)

    def wait(self, start: int, end: int) -> Path:
        while True:
            if self.cancelled.is_set():
                raise LoadError(f"{self.final}: the stream was closed")
            try:
                return self.flight.wait(start, end, timeout=POLL_S)
            except TimeoutError:
                pass
            except Exception as exc:
                raise _Replaced(str(exc)) from exc  # this attempt failed; the pull decides
            if self.pull.done:
                self.pull.wait()  # raises the pull's error
                return self.final
            if self.flight.partial is None:  # not fetched by this process (yet)
                found = self._elsewhere(start, end)
                if found is not None:
                    return found

    def _elsewhere(self, start: int, end: int) -> Path | None:
        size = self.file.size
        if self.blob is not None and _size_of(self.blob) == size:
            return self.blob  # verified earlier, by anyone
        landed = self.spot.read()
        if landed is None or landed.size != size:
            return None
        if landed.sha256 is not None:
            return None  # committed: the blob path above, or the view once the pull links it
        if landed.covers(start, end):
            return self.spot.partial
        return None


class _LandingReader:
    """Reads chunks of one file from wherever its feed says they landed.

    The first read binds the reader to one inode (the partial's, which the
    commit links into the blob store unchanged). Every later read checks that
    the path it is given is still that inode, so bytes of a discarded attempt
    are never mixed with those of the next; :meth:`check_verified` compares it
    with the file in the cache's view once the pull is over.
    """

    def __init__(self, feed: _Feed) -> None:
        self.feed = feed
        self._lock = threading.Lock()
        self._fd = -1
        self._inode: tuple[int, int] | None = None
        self._generation = 0

    def _fd_for(self, path: Path) -> int | None:
        """Our descriptor, if ``path`` is the inode we read; None if it vanished meanwhile."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # a partial renamed into a blob between the wait and now: wait again
        except OSError as exc:
            raise LoadError(f"{self.feed.final}: cannot read {path}: {exc}") from exc
        inode = (st.st_dev, st.st_ino)
        with self._lock:
            if self._inode is None:
                try:
                    self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    raise LoadError(f"{self.feed.final}: cannot read {path}: {exc}") from exc
                opened = os.fstat(self._fd)
                if (opened.st_dev, opened.st_ino) != inode:  # replaced between stat and open
                    os.close(self._fd)
                    self._fd = -1
                    return None
                self._inode = inode
                self._generation = self.feed.flight.generation
            elif inode != self._inode or self._rewritten():
                raise _Replaced(f"{self.feed.final}: the bytes being read were replaced")
            return self._fd

    def read_into(self, start: int, end: int, dst: memoryview) -> None:
        """Fill ``dst[:end - start]`` with the file's bytes ``[start, end)`` once they landed."""
        while True:
            path = self.feed.wait(start, end)
            fd = self._fd_for(path)
            if fd is not None:
                break
            time.sleep(POLL_S)
        pos = start
        while pos < end:
            try:
                n = os.preadv(fd, [dst[pos - start:end - start]], pos)
            except OSError as exc:
                raise LoadError(f"{self.feed.final}: read failed at byte {pos}: {exc}") from exc
            if n <= 0:
                raise LoadError(f"{self.feed.final}: the file ended at byte {pos}")
            pos += n

    # -- the ChunkReader of TensorStream -------------------------------------------

    def read(self, start: int, end: int, dst: memoryview) -> ReadCounts:
        self.read_into(start, end, dst)
        # Just written by the fetcher: copied out of the page cache.
        return ReadCounts(page_cache=end - start)

    def close(self) -> None:
        pass  # the descriptor outlives the file's TensorStream: check_verified needs it

    def release(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _rewritten(self) -> bool:
        """Whether this process's fetch started the file over since we bound to it.

        Only counted when we bound while this process fetched (generation > 0):
        a fetch that starts later on the same inode resumes another process's
        partial and does not rewrite the bytes its record named.
        """
        return self._generation > 0 and self.feed.flight.generation != self._generation

    def check_verified(self) -> None:
        """After a successful pull: the bytes read are those of the verified file."""
        if self._inode is None:
            return
        st = os.stat(self.feed.final)
        if (st.st_dev, st.st_ino) != self._inode or self._rewritten():
            raise _Replaced(f"{self.feed.final}: the bytes read are not the verified file's")


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_header(reader: _LandingReader, where: Path, size: int) -> SafetensorsHeader:
    """Parse a file's header as soon as its bytes landed (the 8-byte length, then the JSON)."""
    if size < 8:
        raise LoadError(f"{where}: not a safetensors file: {size} bytes, "
                        "too short for the 8-byte header length")
    prefix = bytearray(8)
    reader.read_into(0, 8, memoryview(prefix))
    header_size = int.from_bytes(prefix, "little")
    check_header_size(where, header_size, size)  # never wait for bytes past the end
    raw = bytearray(header_size)
    reader.read_into(8, 8 + header_size, memoryview(raw))
    return parse_header(where, bytes(raw), size)


def _plan(files: list[RemoteFile]) -> tuple[RemoteFile | None, list[RemoteFile]]:
    """The shard index (if any) and the safetensors files at the top of the listing.

    Mirrors ``read_checkpoint`` on a directory, before the directory exists.
    """
    top = {f.path: f for f in files if "/" not in f.path}
    index = top.get(INDEX_NAME)
    if index is None:
        candidates = sorted(p for p in top if p.endswith(".safetensors.index.json"))
        if len(candidates) > 1:
            raise LoadError(f"several shard indexes ({', '.join(candidates)}); pass one file")
        index = top[candidates[0]] if candidates else None
    shards = [top[p] for p in sorted(top) if p.endswith(".safetensors")]
    return index, shards


class OriginStream(Iterator[tuple[str, torch.Tensor]]):
    """``(name, tensor)`` in file order from a source being pulled (see the module docstring).

    Built by :func:`open_origin_stream`. ``stats`` sums the files' loads;
    ``checkpoint`` holds every header read (complete once exhausted).
    """

    def __init__(self, uri: str, caches: Caches, spec: CacheSpec, source: RemoteSource,
                 files: list[RemoteFile], load_options: dict[str, Any]) -> None:
        from ..fetch import Landing

        self._t0 = time.perf_counter()
        self.uri = uri
        self.stats = LoadStats()
        self._options = load_options
        self._closed = False
        self._cancelled = threading.Event()
        self._current: TensorStream | None = None
        self._headers: list[SafetensorsHeader] = []
        self._names: dict[str, Path] = {}
        self._readers: list[_LandingReader] = []
        self._flights: list[Flight] = []
        self._yielded = 0
        self._file: RemoteFile | None = None  # the file being read
        self._file_yielded = 0  # tensors handed out of it
        index, shards = _plan(files)
        self.view = caches.store.views.dir(spec.bucket, spec.path or spec.name)
        landing = Landing(caches.store)
        wanted = ([index] if index is not None else []) + shards
        # Watch before the pull starts, so no landed range goes unseen.
        self._flights = [landing.watch(source.identity(f)) for f in wanted]
        self._pull = _Pull(caches, spec, [f.path for f in wanted])
        self._feeds: dict[str, _Feed] = {}
        for f, flight in zip(wanted, self._flights, strict=True):
            spot = landing.spot(source.identity(f))
            self._feeds[f.path] = _Feed(f, self.view / f.path, flight, spot,
                                        caches.store.blobs.path, self._pull,
                                        self._cancelled)
        try:
            self._weight_map: dict[str, str] | None = None
            if index is not None:
                shards = self._read_index(index, shards)
            if not shards:
                raise LoadError(f"{uri}: no *.safetensors files and no {INDEX_NAME}")
            self._todo = list(shards)
            self.stats.files = len(shards)
        except BaseException:
            self.close()
            raise

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.view, tuple(self._headers))

    def _read_index(self, index: RemoteFile, shards: list[RemoteFile]) -> list[RemoteFile]:
        """The shards in the order the index names them, and its weight map kept.

        Parsed from its landed bytes, like a header; if they do not parse or name
        shards the source lacks, it is read again once verified (bad bytes in
        transit, or a bad index: the verified bytes tell which).
        """
        where = self.view / index.path
        feed = self._feeds[index.path]
        reader = _LandingReader(feed)
        raw = bytearray(index.size)
        try:
            reader.read_into(0, index.size, memoryview(raw))
            order = self._shards_of(parse_index(bytes(raw), where), shards, index)
        except (_Replaced, LoadError):
            reader.release()
            try:
                raw = bytearray(feed.wait_verified().read_bytes())
            except OSError as exc:
                raise LoadError(f"{where}: unreadable shard index: {exc}") from exc
            return self._shards_of(parse_index(bytes(raw), where), shards, index)
        self._readers.append(reader)  # its bytes are checked at the end like a shard's
        return order

    def _shards_of(self, weight_map: dict[str, str], shards: list[RemoteFile],
                   index: RemoteFile) -> list[RemoteFile]:
        by_name = {f.path: f for f in shards}
        order = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in order if name not in by_name]
        if missing:
            raise LoadError(f"{self.view / missing[0]}: shard listed in {index.path}"
                            f" is missing at {self.uri}")
        self._weight_map = weight_map
        return [by_name[name] for name in order]

    def _open_next(self) -> TensorStream:
        self._file = self._todo.pop(0)
        self._file_yielded = 0
        return self._open(self._file)

    def _open(self, file: RemoteFile, *, verified: bool = False) -> TensorStream:
        """A stream of one file's tensors, its header read as soon as it landed.

        Bytes that turn out to be a failed attempt's before any tensor of the file
        was handed out cost nothing but a wait: the file is opened again from its
        verified bytes once the pull is over (``verified``).
        """
        where = self.view / file.path
        reader = _LandingReader(self._feeds[file.path])
        try:
            header = _read_header(reader, where, file.size)
        except (_Replaced, LoadError):
            reader.release()
            if verified:
                raise
            self._pull.wait()  # its error, if the bytes were bad
            return self._open(file, verified=True)
        for t in header.tensors:
            other = self._names.get(t.name)
            if other is not None and other != where:
                raise LoadError(f"{where}: tensor {t.name!r} is also defined in {other}")
            self._names[t.name] = where
        if self._weight_map is not None:
            have = {t.name for t in header.tensors}
            for tensor, shard in self._weight_map.items():
                if shard == file.path and tensor not in have:
                    raise LoadError(f"{where}: has no tensor {tensor!r}, which the index"
                                    " says it holds")
        self._readers = [r for r in self._readers if r.feed is not reader.feed]
        self._readers.append(reader)
        self._headers = [h for h in self._headers if h.path != where] + [header]
        return TensorStream(Checkpoint(self.view, (header,)), open_reader=lambda _: reader,
                            **self._options)

    def __iter__(self) -> OriginStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        try:
            while True:
                if self._closed:
                    raise StopIteration
                if self._current is not None:
                    try:
                        item = next(self._current)
                    except StopIteration:
                        self._add_stats(self._current.stats)
                        self._current = None
                        continue
                    except _Replaced:
                        if self._file_yielded:
                            raise
                        # Nothing of this file was handed out: read it from its verified bytes.
                        self._current = None
                        self._pull.wait()
                        assert self._file is not None
                        self._current = self._open(self._file, verified=True)
                        continue
                    self._yielded += 1
                    self._file_yielded += 1
                    self.stats.seconds = time.perf_counter() - self._t0
                    return item
                if not self._todo:
                    self._finish()
                    self.close()
                    raise StopIteration
                self._current = self._open_next()
        except StopIteration:
            raise
        except _Replaced:
            error = self._outcome()
            self.close()
            raise error from None
        except BaseException as exc:
            self.close()
            if self._pull.done and self._pull.error is exc:
                self._note(exc)
            raise

    def _finish(self) -> None:
        """The last tensor is out: the pull must succeed, and what we read must be its bytes."""
        try:
            self._pull.wait()
        except BaseException as exc:
            self._note(exc)
            raise
        try:
            for reader in self._readers:
                reader.check_verified()
        except _Replaced:
            raise self._outcome() from None

    def _outcome(self) -> BaseException:
        """The error to raise after bytes being read were replaced: the pull's, or ours."""
        try:
            self._pull.wait()
        except BaseException as exc:  # noqa: BLE001
            self._note(exc)
            return exc
        return RefetchedError(
            f"{self.uri}: a file was fetched again after its bytes failed verification while"
            " tensors were streamed from it; the tensors yielded so far may be wrong: discard"
            f" them and load again (the cache at {self.view} now holds verified bytes)")

    def _note(self, exc: BaseException) -> None:
        if self._yielded:
            exc.add_note(f"{self._yielded} tensor(s) were already yielded from unverified bytes"
                         f" of {self.uri}: discard them")

    def _add_stats(self, s: LoadStats) -> None:
        self.stats.tensors += s.tensors
        self.stats.tensor_bytes += s.tensor_bytes
        self.stats.page_cache_bytes += s.page_cache_bytes
        self.stats.direct_bytes += s.direct_bytes
        self.stats.buffered_bytes += s.buffered_bytes
        self.stats.copied_names.extend(s.copied_names)
        self.stats.cast += s.cast

    def close(self) -> None:
        """Stop streaming; the pull goes on in its thread (see the module docstring)."""
        if self._closed:
            return
        self._closed = True
        self._cancelled.set()
        if self._current is not None:
            self._current.close()
            self._current = None
        for reader in self._readers:
            reader.release()
        for flight in self._flights:
            flight.close()

    def __enter__(self) -> OriginStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open_origin_stream(uri: str, load_options: dict[str, Any]) -> OriginStream | None:
    """An :class:`OriginStream` for ``uri``, or None where loading goes the ordinary way:
    a local source, a cache already Available, a source with no safetensors at its top."""
    from ..caches import AVAILABLE, Caches, check_listing, make_spec
    from ..config import Settings
    from ..sources import RemoteSource, parse_source

    settings = Settings.from_env()
    source = parse_source(uri, {}, settings)
    if not isinstance(source, RemoteSource):
        return None
    caches = Caches(settings)
    spec = make_spec(source=uri, options={}, name=source.default_name())
    if caches.exists(spec.name) and caches.get(spec.name).status == AVAILABLE:
        return None  # the pull is a no-op; the ordinary path reads the view
    try:
        files = check_listing(source.list_files().files)
        index, shards = _plan(files)
        if index is None and not shards:
            return None  # nothing to stream; pulling first says why it cannot load
        return OriginStream(uri, caches, spec, source, files, load_options)
    finally:
        source.close()  # the pull has a source of its own; ours only listed and named paths


__all__ = ["OriginStream", "open_origin_stream"]
