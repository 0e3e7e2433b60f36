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

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoadError, RefetchedError
from .checkpoint import INDEX_NAME, Checkpoint, parse_index
from .feed import Feed, LandingReader, Pull, Replaced, read_landed_header
from .format import SafetensorsHeader
from .stats import LoadStats
from .stream import TensorStream

if TYPE_CHECKING:
    from ..caches import Caches, CacheSpec
    from ..fetch import Flight
    from ..sources import RemoteFile, RemoteSource

# One read of the stream when the caller names no chunk size: small, so that a
# tensor is handed out soon after its bytes land, not after a 16 MiB chunk.
STREAM_CHUNK_BYTES = 1024 * 1024


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
        self._readers: list[LandingReader] = []
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
        self._pull = Pull(caches, spec, [f.path for f in wanted])
        self._feeds: dict[str, Feed] = {}
        for f, flight in zip(wanted, self._flights, strict=True):
            spot = landing.spot(source.identity(f))
            self._feeds[f.path] = Feed(f, self.view / f.path, flight, spot,
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
        reader = LandingReader(feed)
        raw = bytearray(index.size)
        try:
            reader.read_into(0, index.size, memoryview(raw))
            order = self._shards_of(parse_index(bytes(raw), where), shards, index)
        except (Replaced, LoadError):
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
        reader = LandingReader(self._feeds[file.path])
        try:
            header = read_landed_header(reader, where, file.size)
        except (Replaced, LoadError):
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
                    except Replaced:
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
        except Replaced:
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
        except Replaced:
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
