"""Pulling: bringing a declared cache to Available.

A pull lists the source, filters it (include/exclude globs), checks limits (the
cache's own, the store's, the disk), makes room by evicting least recently used
caches (``evict.py``), then fetches files in parallel, largest first. Files
already present (same blob, same git blob id, or same origin version from an
interrupted pull) are linked without fetching again. Progress and timestamped
events go to the catalog as they happen, so any process (the CLI, the control
API) can follow a pull that another process runs. One pull per cache at a time
(a lock under ``locks/pull/``); a second waits for the first and finds it done.

The source URI is parsed once per pull: :class:`SourcePull` (``cachemesh pull``
and :func:`cachemesh.pull`) parses it, names the cache after it, and hands the
same :class:`~cachemesh.sources.Source` to the declaration and the pull.
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import (
    CachemeshError,
    CapacityError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    UnsafePathError,
)
from ..sources import RemoteFile, Source, parse_source, scheme_of
from ..store import BlobRef
from ..store.hub_layout import HubRepo, is_commit
from ..store.locks import is_locked
from ..store.names import check_relpath
from . import evict
from .guard import check_restricted
from .spec import AVAILABLE, FAILED, GIB, LOADING, CacheSpec, Progress, PullResult, make_spec

if TYPE_CHECKING:
    from .facade import Caches

# How often progress is written to the database during a pull.
PROGRESS_INTERVAL_S = 0.5


class _Tracker:
    """Thread-safe pull progress, written to the catalog and told to listeners."""

    def __init__(self, caches: Caches, name: str, files_total: int, bytes_total: int,
                 listener: Callable[[Progress], None] | None) -> None:
        self.caches, self.name, self.listener = caches, name, listener
        self.p = Progress(files_total=files_total, bytes_total=bytes_total)
        self.fetched_bytes = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_write = 0.0

    def add_bytes(self, n: int, *, fetched: bool = True) -> None:
        with self._lock:
            self.p.bytes_done += n
            if fetched:
                self.fetched_bytes += n
        self._tick()

    def file_done(self) -> None:
        with self._lock:
            self.p.files_done += 1
        self._tick()

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-6)
        with self._lock:
            self.p.rate = self.fetched_bytes / elapsed
            snapshot = Progress(**asdict(self.p))
            due = force or now - self._last_write >= PROGRESS_INTERVAL_S
            if due:
                self._last_write = now
        if due:
            write_progress(self.caches, self.name, snapshot)
        if self.listener is not None:
            self.listener(snapshot)

    def flush(self) -> None:
        self._tick(force=True)


def write_progress(caches: Caches, name: str, p: Progress) -> None:
    caches.catalog.update(name, bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                          files_done=p.files_done, files_total=p.files_total, rate=p.rate)


def pull_running(caches: Caches, name: str) -> bool:
    """Whether a live process holds cache ``name``'s pull lock."""
    return is_locked(caches.store.locks_dir / "pull" / f"{name}.lock")


def _patterns(patterns: list[str]) -> list[str]:
    # As huggingface_hub's allow_patterns/ignore_patterns (users copy these lists from
    # snapshot_download): "dir/" means everything below dir.
    return [p + "*" if p.endswith("/") else p for p in patterns]


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def select_files(files: list[RemoteFile], include: list[str], exclude: list[str]) -> list[RemoteFile]:
    """Apply include/exclude globs as huggingface_hub's ``allow_patterns`` and
    ``ignore_patterns``: matched against the full path only (``*`` crosses ``/``), and a
    pattern ending in ``/`` takes everything below that folder. No include: every file."""
    include, exclude = _patterns(include), _patterns(exclude)
    return [
        f for f in files
        if (not include or _matches(f.path, include)) and not (exclude and _matches(f.path, exclude))
    ]


def check_listing(files: list[RemoteFile]) -> list[RemoteFile]:
    """Refuse hostile or contradictory names from an origin before any write."""
    seen: dict[str, RemoteFile] = {}
    out = []
    for f in files:
        rel = check_relpath(f.path, "file path from the source")
        if f.size < 0:
            raise IntegrityError(f"the source lists {rel} with a negative size")
        if rel in seen:
            raise UnsafePathError(f"the source lists {rel!r} twice")
        seen[rel] = f
        out.append(f if rel == f.path else RemoteFile(**{**asdict(f), "path": rel}))
    dirs = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
    clash = sorted(dirs & seen.keys())
    if clash:
        raise UnsafePathError(f"the source lists {clash[0]!r} both as a file and as a directory")
    return out


def run_pull(caches: Caches, name: str, *, source: Source | None = None,
             refresh: bool = False, on_progress: Callable[[Progress], None] | None = None,
             first: Sequence[str] = ()) -> PullResult:
    """Bring declared cache ``name`` to Available (waits for a pull another process runs).

    ``source``: the cache's source, already parsed (the caller closes it); without it,
    the cache's spec is parsed here. Files are fetched largest first, except the paths
    in ``first``, which start before all others and in that order (a loader streaming
    the files while they land wants its shard index and first shard early).
    """
    info = caches.get(name)
    if info.status == AVAILABLE and not refresh:
        caches.touch(name)
        return PullResult(view=Path(info.view))
    with caches.store.lock("pull", name):
        info = caches.get(name)  # it may have changed while we waited
        if info.status == AVAILABLE and not refresh:
            caches.touch(name)
            return PullResult(view=Path(info.view))
        spec = CacheSpec.model_validate(info.spec)
        caches.catalog.update(name, status=LOADING, error=None)
        caches.catalog.add_event(name, "pull-started", f"pulling from {info.source}")
        own = source is None
        try:
            if source is None:
                source = parse_source(spec.source, spec.options, caches.settings)
            try:
                result, hub = _pull_files(caches, spec, source, on_progress, first)
            finally:
                if own:
                    source.close()
            caches.catalog.update(name, status=AVAILABLE, error=None, last_access=time.time())
            if hub is not None:
                # Available first: then a sync that another cache of the same repo
                # runs meanwhile keeps this cache's files too.
                caches.hub_sync.sync(hub[0], including=name, trees=hub[1])
        except BaseException as exc:
            _record_failure(caches, name, source, exc)
            raise
        caches.catalog.add_event(
            name, "available",
            f"{result.files_fetched} file(s) fetched ({result.bytes_fetched} bytes),"
            f" {result.files_reused} already present"
            + (f"; {result.verification}" if result.verification else ""),
        )
        return result


def _record_failure(caches: Caches, name: str, source: Source | None,
                    exc: BaseException) -> None:
    """Status Failed with the error, and an event; a capacity error that names only a
    path is raised again naming the cache."""
    message = str(exc) if isinstance(exc, CachemeshError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        message = "interrupted; pull again to resume"
    if isinstance(exc, CapacityError) and repr(name) not in message:
        message = f"cache {name!r}: {message}"  # a full disk names the path only
    try:
        caches.catalog.update(name, status=FAILED, error=message)
        caches.catalog.add_event(name, "failed", message, level="error")
        # The hub view shows Available caches only.
        caches.hub_sync.sync_quietly(name, _hub_repo(source))
    except CachemeshError:
        pass  # a full disk or a locked database: the row still says Loading,
        # which reads as Failed ("interrupted") once this pull's lock is gone
    if isinstance(exc, CapacityError) and message != str(exc):
        raise CapacityError(message) from exc


def _hub_repo(source: Source | None) -> HubRepo | None:
    if source is None:
        return None
    try:
        return source.hub_repo()
    except CachemeshError:
        return None


def _pull_files(
    caches: Caches, spec: CacheSpec, source: Source,
    on_progress: Callable[[Progress], None] | None, first: Sequence[str],
) -> tuple[PullResult, tuple[HubRepo, dict | None] | None]:
    """Fetch and link every file; returns the result and, for a source shown
    under hub/, its repo and the commit's tree listing."""
    assert spec.path is not None
    store, catalog = caches.store, caches.catalog
    listing = source.list_files()
    for note in listing.notes:
        catalog.add_event(spec.name, "warning", note, level="warning")
    files = check_listing(select_files(listing.files, spec.include, spec.exclude))
    if not files:
        raise InvalidInputError(
            f"no files to pull from {source.display_uri} (check include/exclude)")
    check_restricted(store, spec, source, files)
    total = sum(f.size for f in files)
    if spec.size_limit_gib is not None and total > spec.size_limit_gib * GIB:
        raise CapacityError(
            f"cache {spec.name!r} needs {total} bytes, over its size limit of"
            f" {spec.size_limit_gib} GiB"
        )
    remote = scheme_of(spec.source) != "file"
    verification = _verification(caches, spec.name, files) if remote else ""
    existing = store.file_rows(spec.name)
    evicted = evict.make_room(caches, spec.name, files, existing)
    catalog.update(spec.name, revision=listing.revision, files_total=len(files),
                   bytes_total=total, files_done=0, bytes_done=0, rate=0.0)
    # Files the origin no longer lists leave the view, then the database: a crash
    # in between leaves rows without links (an unfinished pull), never a view
    # file the database does not know.
    listed = {f.path for f in files}
    stale = sorted(existing.keys() - listed)
    store.views.prune(spec.bucket, spec.path, listed)
    if stale:
        store.forget_files(spec.name, stale)

    tracker = _Tracker(caches, spec.name, len(files), total, on_progress)
    result = PullResult(view=store.views.dir(spec.bucket, spec.path), evicted=evicted,
                        verification=verification)
    counts_lock = threading.Lock()

    def pull_one(f: RemoteFile) -> None:
        fetched = _pull_file(caches, spec, source, f, existing.get(f.path), tracker)
        with counts_lock:
            if fetched:
                result.files_fetched += 1
                result.bytes_fetched += f.size
            else:
                result.files_reused += 1
        tracker.file_done()

    # Largest first, so the long transfers start early; ``first`` before them.
    rank = {path: i for i, path in enumerate(first)}
    order = sorted(files, key=lambda f: (rank.get(f.path, len(rank)), -f.size))
    with ThreadPoolExecutor(caches.settings.fetch_concurrency, "cachemesh-pull") as pool:
        futures = [pool.submit(pull_one, f) for f in order]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in pending:
            fut.cancel()
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                wait(futures)  # let running transfers stop before reporting
                raise fut.exception()  # type: ignore[misc]
    tracker.flush()
    repo = source.hub_repo()
    if repo is None or not listing.revision or not is_commit(listing.revision):
        return result, None
    return result, (repo, {listing.revision: listing.hub_tree} if listing.hub_tree else None)


def _verification(caches: Caches, name: str, files: list[RemoteFile]) -> str:
    """What each file's bytes are checked against before they become visible.

    Returned for the "available" event; files with nothing but a size to
    check also get a warning event now.
    """
    kinds = {k: sum(1 for f in files if f.checksum_kind == k)
             for k in ("sha256", "git-sha1", "md5", "size")}
    if kinds["size"]:
        caches.catalog.add_event(
            name, "verification",
            f"{kinds['size']} file(s) have no checksum at the origin; verified by size only",
            level="warning")
    labels = {"sha256": "the sha256", "git-sha1": "the git blob id",
              "md5": "the MD5 (ETag)", "size": "the size only"}
    parts = [f"{n} against {labels[k]}" for k, n in kinds.items() if n]
    return "verified: " + ", ".join(parts)


def _pull_file(caches: Caches, spec: CacheSpec, source: Source, f: RemoteFile,
               row: dict | None, tracker: _Tracker) -> bool:
    """Make one file present in the cache. Returns True if bytes were fetched."""
    assert spec.path is not None
    store = caches.store

    def link(ref: BlobRef) -> bool:
        assert spec.path is not None
        return store.add_file(spec.name, spec.bucket, spec.path, f.path, ref=ref,
                              origin_tag=f.origin_tag)

    # Same origin version as an earlier, interrupted pull: relink, no fetch.
    if row is not None and row["size"] == f.size and row["origin_tag"] == f.origin_tag \
            and f.origin_tag is not None and (f.sha256 is None or row["sha256"] == f.sha256):
        if link(BlobRef(row["sha256"], row["size"])):
            tracker.add_bytes(f.size, fetched=False)
            return False
    # The origin published a checksum we already hold: dedup, no fetch.
    if f.sha256 is not None and link(BlobRef(f.sha256, f.size)):
        tracker.add_bytes(f.size, fetched=False)
        return False
    # A git blob id names bytes too: reuse a blob fetched under the same id.
    known = _blob_for_git_sha1(caches, f) if f.sha256 is None and f.git_sha1 else None
    if known is not None and link(known):
        tracker.add_bytes(f.size, fetched=False)
        return False
    for _ in range(3):
        ref = source.fetch(f, store, tracker.add_bytes)
        if ref.size != f.size:
            raise IntegrityError(f"{f.path}: the source listed {f.size} bytes, got {ref.size}")
        if f.sha256 is not None and ref.sha256 != f.sha256:
            raise IntegrityError(f"{f.path}: sha256 {ref.sha256} does not match {f.sha256}")
        if link(ref):
            return True
        # gc removed the fresh blob before we linked it: fetch again.
    raise ConflictError(f"{f.path}: the blob kept disappearing while being linked (gc running?)")


def _blob_for_git_sha1(caches: Caches, f: RemoteFile) -> BlobRef | None:
    """A stored blob whose git blob id is ``f.git_sha1`` (checked by hashing it)."""
    assert f.git_sha1 is not None
    for sha256 in caches.catalog.blobs_tagged(f.git_sha1, f.size):
        digest = hashlib.sha1(b"blob %d\0" % f.size)
        try:
            with open(caches.store.blobs.path(sha256), "rb") as blob:
                while chunk := blob.read(1024 * 1024):
                    digest.update(chunk)
        except OSError:
            continue
        if digest.hexdigest() == f.git_sha1:
            return BlobRef(sha256, f.size)
    return None


def ensure(caches: Caches, spec: CacheSpec, *, source: Source | None = None,
           refresh: bool = False, on_progress: Callable[[Progress], None] | None = None,
           first: Sequence[str] = ()) -> PullResult:
    """Declare the cache if needed and pull it: what ``cachemesh pull`` does.

    If this call declared the cache and the pull fails before any file landed (a
    missing source, a limit), the cache is removed again: a one-shot pull that fails
    leaves nothing behind. ``source``: ``spec.source`` parsed (the caller closes it).
    """
    own = source is None
    if source is None:
        source = parse_source(spec.source, spec.options, caches.settings)
    try:
        existed = caches.exists(spec.name)
        caches.create(spec, source=source)
        try:
            return run_pull(caches, spec.name, source=source, refresh=refresh,
                            on_progress=on_progress, first=first)
        except CachemeshError:
            if not existed and not caches.store.file_rows(spec.name):
                caches.rm(spec.name, force=True)
            raise
    finally:
        if own:
            source.close()


class SourcePull:
    """One pull of a source URI, as ``cachemesh pull`` and :func:`cachemesh.pull` run it:
    the URI parsed once, the cache named after it unless ``fields`` name it.

    ``fields``: the :class:`CacheSpec` fields besides ``source`` and ``options``.
    Use it as a context manager (it closes the source)::

        with SourcePull(caches, "hf://org/name", {}) as job:
            result = job.run()
    """

    def __init__(self, caches: Caches, uri: str, options: dict[str, Any],
                 **fields: Any) -> None:
        self.caches = caches
        self.source = parse_source(uri, options, caches.settings)
        try:
            fields.setdefault("name", self.source.default_name())
            self.spec = make_spec(source=uri, options=options, **fields)
        except BaseException:
            self.source.close()
            raise

    def run(self, *, refresh: bool = False,
            on_progress: Callable[[Progress], None] | None = None) -> PullResult:
        return ensure(self.caches, self.spec, source=self.source, refresh=refresh,
                      on_progress=on_progress)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> SourcePull:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def pull(source: str, **options: Any) -> Path:
    """Pull ``source`` into the local cache and return its view directory.

    Options: ``name``, ``bucket``, ``path``, ``include``, ``exclude``,
    ``size_limit_gib``, ``retention_days``, ``refresh``, ``on_progress``,
    ``settings``, and source options (``endpoint_url``, ``sha256``,
    ``follow_symlinks``, …). An existing cache of the same name and spec is
    reused (and resumed if an earlier pull was interrupted).
    """
    from .facade import Caches

    settings = options.pop("settings", None) or Settings.from_env()
    refresh = bool(options.pop("refresh", False))
    on_progress = options.pop("on_progress", None)
    fields = {k: options.pop(k) for k in list(options) if k in CacheSpec.model_fields
              and k not in ("source", "options")}
    with SourcePull(Caches(settings), source, options, **fields) as job:
        return job.run(refresh=refresh, on_progress=on_progress).view
