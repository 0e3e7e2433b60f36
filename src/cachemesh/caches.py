"""The DataCache lifecycle: declare, pull, report, use, evict, remove.

A cache is a named set of files from one source, shown as a view directory
``buckets/<bucket>/<path>``. Its status goes::

    Pending --pull--> Loading --+--> Available
                                +--> Failed  (the error says why; pull again to retry)

A pull lists the source, filters it (include/exclude globs), checks limits
(the cache's own, the store's, the disk), makes room by evicting least recently
used caches that are neither pinned nor in use, then fetches files in parallel.
Files already present (same blob, same git blob id, or same origin version from
an interrupted pull) are linked without fetching again. Caches pulled from a
Hugging Face hub are also shown in its cache layout under ``hub/`` (see
``store/hub_layout.py``): after every pull and every removal, the repo's folder
is made to show exactly what the Available caches of that repo hold (caches in
a protected bucket never appear there: ``hub/`` is readable by every local
user; see ``store/buckets.py``). Progress
and timestamped events are written to the database as they happen, so any
process (the CLI, the control API) can follow a pull that another process runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import Settings
from .errors import (
    CachemeshError,
    CacheNotFoundError,
    CapacityError,
    ConflictError,
    ForbiddenError,
    IntegrityError,
    InUseError,
    InvalidInputError,
    UnsafePathError,
)
from .sources import RemoteFile, Source, parse_source
from .sources.redact import redact_source
from .store import BlobRef, Problem, Store
from .store.hub_layout import HubClaim, HubFile, HubLayout, HubRepo, TreeEntry, is_commit
from .store.names import check_name, check_relpath, is_within
from .store.quota import Candidate, plan_eviction

PENDING, LOADING, AVAILABLE, FAILED, DELETING = (
    "Pending", "Loading", "Available", "Failed", "Deleting",
)
GIB = 1024**3
# Keep this much of the disk free when planning a pull (2% of it, at most 256 MiB).
DISK_RESERVE_MAX = 256 * 1024**2
DISK_RESERVE_SHARE = 0.02
# How often progress is written to the database during a pull.
PROGRESS_INTERVAL_S = 0.5


# Bounds of a spec's numbers: past them a date or a byte count stops being a number
# (an expiry date past year 9999, a quota past any disk).
MAX_RETENTION_DAYS = 36_500.0
MAX_SIZE_LIMIT_GIB = float(1024**3)  # 1 EiB


class CacheSpec(BaseModel):
    """What a user declares. Validated before anything touches the disk."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    bucket: str = "default"
    path: str | None = None  # defaults to the name
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    size_limit_gib: float | None = Field(default=None, gt=0, le=MAX_SIZE_LIMIT_GIB)
    retention_days: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "cache name")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_name(v, "bucket")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_relpath(v, "cache path", absolute_ok=True)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern or "\x00" in pattern:
                raise ValueError(f"invalid glob {pattern!r}")
        return v

    @model_validator(mode="after")
    def _default_path(self) -> CacheSpec:
        if self.path is None:
            self.path = self.name
        return self


@dataclass
class Progress:
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    rate: float = 0.0  # bytes per second over the pull so far


@dataclass
class Event:
    id: int
    ts: float
    level: str
    kind: str
    message: str


@dataclass
class CacheInfo:
    name: str
    bucket: str
    path: str
    source: str
    status: str
    view: str
    pinned: bool
    in_use: bool
    error: str | None
    revision: str | None
    progress: Progress
    size_limit_gib: float | None
    retention_days: float | None
    created_at: float
    updated_at: float
    last_access: float
    spec: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """For people and the API: the spec's source redacted (the row's already is)."""
        out = asdict(self)
        if isinstance(out["spec"].get("source"), str):
            out["spec"]["source"] = redact_source(out["spec"]["source"])
        return out


@dataclass
class PullResult:
    view: Path
    files_fetched: int = 0
    files_reused: int = 0  # already present: same blob or same origin version
    bytes_fetched: int = 0
    evicted: list[str] = field(default_factory=list)
    verification: str = ""  # what the bytes were checked against, for the events


@dataclass
class GcReport:
    removed_caches: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0
    tmp_bytes_freed: int = 0


class _Tracker:
    """Thread-safe pull progress, written to the DB and told to listeners."""

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
            self.caches._write_progress(self.name, snapshot)
        if self.listener is not None:
            self.listener(snapshot)

    def flush(self) -> None:
        self._tick(force=True)


def _matches(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def select_files(files: list[RemoteFile], include: list[str], exclude: list[str]) -> list[RemoteFile]:
    """Apply include/exclude globs (matched against the path and the file name)."""
    chosen = [
        f for f in files
        if (not include or _matches(f.path, include)) and not (exclude and _matches(f.path, exclude))
    ]
    return chosen


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


class Caches:
    """The caches of one store. Safe to use from several threads and processes."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.store = Store(self.settings.home, busy_timeout=self.settings.db_busy_timeout_s)
        self.db = self.store.db
        self.hub = HubLayout(self.store.home)
        self.buckets = self.store.buckets
        # Cheap and idempotent: repairs modes that a crash or an older cachemesh left open.
        self.buckets.secure()

    # -- reading -----------------------------------------------------------------

    def _row(self, name: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM caches WHERE name = ?", (check_name(name, "cache name"),))
        if not rows:
            raise CacheNotFoundError(name)
        return dict(rows[0])

    def _info(self, row: dict[str, Any]) -> CacheInfo:
        spec = json.loads(row["spec"])
        status = row["status"]
        if status == LOADING and not self._pull_running(row["name"]):
            # The process that ran the pull died; say so, and let a pull resume it.
            status = FAILED
            row["error"] = row["error"] or "the pull was interrupted; pull again to resume it"
        return CacheInfo(
            name=row["name"], bucket=row["bucket"], path=row["path"], source=row["source"],
            status=status, view=str(self.store.views.dir(row["bucket"], row["path"])),
            pinned=bool(row["pinned"]), in_use=self.store.in_use(row["name"]),
            error=row["error"], revision=row["revision"],
            progress=Progress(row["bytes_done"], row["bytes_total"], row["files_done"],
                              row["files_total"], row["rate"]),
            size_limit_gib=spec.get("size_limit_gib"), retention_days=spec.get("retention_days"),
            created_at=row["created_at"], updated_at=row["updated_at"],
            last_access=row["last_access"], spec=spec,
        )

    def get(self, name: str) -> CacheInfo:
        return self._info(self._row(name))

    def list(self, bucket: str | None = None) -> list[CacheInfo]:
        if bucket is None:
            rows = self.db.query("SELECT * FROM caches ORDER BY name")
        else:
            rows = self.db.query("SELECT * FROM caches WHERE bucket = ? ORDER BY name", (bucket,))
        return [self._info(dict(r)) for r in rows if r["status"] != DELETING]


    def integrity(self, name: str) -> dict[str, tuple[str, int, float]]:
        """The cache's files: path in its view -> the blob's sha256, size and commit time,
        what a model load checks its files against (load/integrity.py)."""
        rows = self.db.query(
            "SELECT f.path, f.sha256, b.size, b.created_at FROM files f"
            " JOIN blobs b ON b.sha256 = f.sha256 WHERE f.cache = ?", (check_name(name),))
        return {r["path"]: (r["sha256"], r["size"], r["created_at"]) for r in rows}

    def mark_corrupt(self, sha256: str, detail: str) -> list[str]:
        """Record that a load found blob ``sha256`` changed since it was committed: an
        error event on every cache that holds it (one write, every view: the blob is
        shared); ``verify --quick`` then re-hashes it (Store.verify). Returns those caches."""
        from .store import CORRUPT_EVENT

        now = time.time()
        with self.db.transaction() as conn:
            names = [r["cache"] for r in conn.execute(
                "SELECT DISTINCT cache FROM files WHERE sha256 = ?", (sha256,))]
            for cache in names:
                conn.execute(
                    "INSERT INTO events (cache, ts, level, kind, message) VALUES (?, ?, ?, ?, ?)",
                    (cache, now, "error", CORRUPT_EVENT,
                     f"blob sha256:{sha256} does not match its sha256 (found by a load: {detail})"))
        return names

    def events(self, name: str, after: int = 0, limit: int = 1000) -> list[Event]:
        self._row(name)
        rows = self.db.query(
            "SELECT id, ts, level, kind, message FROM events WHERE cache = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (name, after, limit),
        )
        return [Event(**dict(r)) for r in rows]

    def view(self, name: str) -> Path:
        row = self._row(name)
        return self.store.views.dir(row["bucket"], row["path"])

    # -- writing -----------------------------------------------------------------

    def _event(self, name: str, kind: str, message: str, level: str = "info") -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO events (cache, ts, level, kind, message) VALUES (?, ?, ?, ?, ?)",
                (name, time.time(), level, kind, message),
            )

    def _update(self, name: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE caches SET {cols} WHERE name = ?", (*fields.values(), name))

    def _write_progress(self, name: str, p: Progress) -> None:
        self._update(name, bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                     files_done=p.files_done, files_total=p.files_total, rate=p.rate)

    def _pull_running(self, name: str) -> bool:
        from .store.locks import is_locked

        return is_locked(self.store.locks_dir / "pull" / f"{name}.lock")

    def create(self, spec: CacheSpec) -> CacheInfo:
        """Declare a cache (status Pending). An identical declaration is a no-op."""
        source = parse_source(spec.source, spec.options, self.settings)
        self.check_source(source, spec.bucket)
        canonical = spec.model_copy(update={"source": source.uri})
        stored = json.loads(json.dumps(canonical.model_dump()))
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM caches WHERE name = ?", (spec.name,)).fetchone()
            if row is not None:
                if json.loads(row["spec"]) != stored:
                    raise ConflictError(
                        f"cache {spec.name!r} exists with a different spec (source {row['source']});"
                        " remove it first or choose another name"
                    )
                return self._info(dict(row))
            for other in conn.execute(
                "SELECT name, path FROM caches WHERE bucket = ?", (spec.bucket,)
            ).fetchall():
                if is_within(spec.path, other["path"]) or is_within(other["path"], spec.path):
                    raise ConflictError(
                        f"path {spec.path!r} in bucket {spec.bucket!r} overlaps cache"
                        f" {other['name']!r} at {other['path']!r}"
                    )
            conn.execute(
                "INSERT INTO caches (name, bucket, path, source, spec, status, created_at,"
                " updated_at, last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (spec.name, spec.bucket, spec.path, source.display_uri, json.dumps(stored),
                 PENDING, now, now, now),
            )
            conn.execute(
                "INSERT INTO events (cache, ts, level, kind, message) VALUES (?, ?, ?, ?, ?)",
                (spec.name, now, "info", "created", f"cache created from {source.display_uri}"),
            )
        return self.get(spec.name)

    def check_source(self, source: Source, bucket: str,
                     roots: tuple[Path, ...] | None = None) -> None:
        """Refuse a local source that would copy the store's own files, or a protected
        bucket's files into another bucket; with ``roots`` (a caller over the API), any
        other local path outside them, every one when ``roots`` is empty.

        Symlinks are resolved first, so a link that points into the store is judged
        by where it leads. A view (``buckets/<bucket>/...``) or ``hub/`` may be a
        source, from the API too: they hold what cachemesh itself shows; so may a
        conversion's staging folder, for the operator. Everything else there (blobs/,
        tmp/, meta.db, the whole store) may not. ``roots=None``: the operator's own
        command (the CLI, ``--model``), not checked against roots.
        """
        root = getattr(source, "root", None)
        if not isinstance(root, Path):
            return  # not a local path
        try:
            real = Path(os.path.realpath(root))
            home = Path(os.path.realpath(self.store.home))
            allowed = None if roots is None else [Path(os.path.realpath(r)) for r in roots]
        except (OSError, ValueError) as exc:
            raise UnsafePathError(f"local source {root!r}: {exc}") from None
        if real != home and home not in real.parents:
            if allowed is None or any(real == r or r in real.parents for r in allowed):
                return
            if not allowed:
                raise UnsafePathError(
                    f"local source {root}: this server takes no local path over its API"
                    " unless CACHEMESH_SERVE_SOURCE_ROOTS names the directories it may"
                    " come from")
            raise UnsafePathError(
                f"local source {root} is outside the directories this server deploys from"
                " (CACHEMESH_SERVE_SOURCE_ROOTS)")
        parts = real.relative_to(home).parts
        if len(parts) >= 2 and parts[0] == "hub":
            return
        if len(parts) >= 3 and parts[:2] == ("tmp", "convert") and roots is None:
            return  # a conversion's staged output (convert/service.py)
        if len(parts) >= 2 and parts[0] == "buckets":
            if self.buckets.is_protected(parts[1]) and parts[1] != bucket:
                raise UnsafePathError(
                    f"local source {root} lies in protected bucket {parts[1]!r}; a cache of"
                    " its files must be in that bucket too")
            return
        raise UnsafePathError(
            f"local source {root} lies in the store's own files; only views"
            " (buckets/<bucket>/...) and hub/ may be a source")

    # -- protected buckets (store/buckets.py) --------------------------------------

    def protect_bucket(self, bucket: str, token: str | None = None) -> str:
        """Protect ``bucket``: its folder private, its caches out of ``hub/``, a token
        to see them over the API. Returns the token (made here unless given)."""

        def hide_from_hub() -> None:  # before the row: the disk is never more open
            for repo in self._hub_repos_of_bucket(bucket):
                self._sync_hub(repo, hide=frozenset({bucket}))

        return self.buckets.protect(bucket, token, before_commit=hide_from_hub)

    def rotate_bucket_token(self, bucket: str, token: str | None = None) -> str:
        return self.buckets.rotate(bucket, token)

    def unprotect_bucket(self, bucket: str) -> None:
        self.buckets.unprotect(bucket)
        for repo in self._hub_repos_of_bucket(bucket):
            self._sync_hub(repo)

    def bucket_list(self) -> list[dict[str, Any]]:
        """Every bucket that holds caches or is protected: name, protected, caches."""
        counts = {r["bucket"]: r["n"] for r in self.db.query(
            "SELECT bucket, COUNT(*) AS n FROM caches GROUP BY bucket")}
        protected = self.buckets.protected()
        return [{"name": b, "protected": b in protected, "caches": counts.get(b, 0)}
                for b in sorted(counts.keys() | protected)]

    def _hub_repos_of_bucket(self, bucket: str) -> list[HubRepo]:
        repos: dict[str, HubRepo] = {}
        for row in self.db.query("SELECT source, spec FROM caches WHERE bucket = ?", (bucket,)):
            repo = self._hub_repo_of(row["source"], json.loads(row["spec"]).get("options"))
            if repo is not None:
                repos[repo.folder] = HubRepo(repo.repo_type, repo.repo_id)
        return list(repos.values())

    def touch(self, name: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE caches SET last_access = ? WHERE name = ?", (time.time(), name))

    def pin(self, name: str, pinned: bool = True) -> CacheInfo:
        self._row(name)
        self._update(name, pinned=int(pinned))
        self._event(name, "pinned" if pinned else "unpinned", "pinned" if pinned else "unpinned")
        return self.get(name)

    @contextmanager
    def open(self, name: str) -> Iterator[Path]:
        """Use an Available cache: gc, eviction and rm leave it alone until exit."""
        with self.store.using(name):
            info = self.get(name)
            if info.status != AVAILABLE:
                raise ConflictError(f"cache {name!r} is {info.status}, not Available")
            self.touch(name)
            yield Path(info.view)

    # -- pulling -----------------------------------------------------------------

    def ensure(
        self,
        spec: CacheSpec,
        *,
        refresh: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        first: Sequence[str] = (),
    ) -> PullResult:
        """Create the cache if needed and pull it: what ``cachemesh pull`` does.

        If this call created the cache and the pull fails before any file
        landed (a missing source, a limit), the cache is removed again: a
        one-shot pull that fails leaves nothing behind. ``first`` is passed
        to :meth:`pull`.
        """
        existed = self.exists(spec.name)
        self.create(spec)
        try:
            return self.pull(spec.name, refresh=refresh, on_progress=on_progress, first=first)
        except CachemeshError:
            if not existed and not self.store.file_rows(spec.name):
                self.rm(spec.name, force=True)
            raise

    def exists(self, name: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM caches WHERE name = ?", (name,)))

    def pull(
        self,
        name: str,
        *,
        refresh: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        first: Sequence[str] = (),
    ) -> PullResult:
        """Bring a declared cache to Available (waits for a pull another process runs).

        Files are fetched largest first, except the paths in ``first``, which
        start before all others and in that order (a loader streaming the
        files while they land wants its shard index and first shard early).
        """
        info = self.get(name)
        if info.status == AVAILABLE and not refresh:
            self.touch(name)
            return PullResult(view=Path(info.view))
        with self.store.lock("pull", name):
            info = self.get(name)  # it may have changed while we waited
            if info.status == AVAILABLE and not refresh:
                self.touch(name)
                return PullResult(view=Path(info.view))
            spec = CacheSpec.model_validate(info.spec)
            self._update(name, status=LOADING, error=None)
            self._event(name, "pull-started", f"pulling from {info.source}")
            try:
                result, hub = self._pull_locked(spec, on_progress, first)
                self._update(name, status=AVAILABLE, error=None, last_access=time.time())
                if hub is not None:
                    # Available first: then a sync that another cache of the same repo
                    # runs meanwhile keeps this cache's files too.
                    self._sync_hub(hub[0], including=name, trees=hub[1])
            except BaseException as exc:
                message = str(exc) if isinstance(exc, CachemeshError) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc, KeyboardInterrupt):
                    message = "interrupted; pull again to resume"
                if isinstance(exc, CapacityError) and repr(name) not in message:
                    message = f"cache {name!r}: {message}"  # a full disk names the path only
                try:
                    self._update(name, status=FAILED, error=message)
                    self._event(name, "failed", message, level="error")
                    # The hub view shows Available caches only.
                    self._sync_hub_quietly(name, self._hub_repo_of(spec.source, spec.options))
                except CachemeshError:
                    pass  # a full disk or a locked database: the row still says Loading,
                    # which reads as Failed ("interrupted") once this pull's lock is gone
                if isinstance(exc, CapacityError) and message != str(exc):
                    raise CapacityError(message) from exc
                raise
            self._event(
                name, "available",
                f"{result.files_fetched} file(s) fetched ({result.bytes_fetched} bytes),"
                f" {result.files_reused} already present"
                + (f"; {result.verification}" if result.verification else ""),
            )
            return result

    def _pull_locked(
        self, spec: CacheSpec, on_progress: Callable[[Progress], None] | None,
        first: Sequence[str] = (),
    ) -> tuple[PullResult, tuple[HubRepo, dict | None] | None]:
        """Fetch and link every file; returns the result and, for a source shown
        under hub/, its repo and the commit's tree listing."""
        source = parse_source(spec.source, spec.options, self.settings)
        try:
            return self._pull_from(spec, source, on_progress, first)
        finally:
            source.close()

    def _pull_from(
        self, spec: CacheSpec, source: Source, on_progress: Callable[[Progress], None] | None,
        first: Sequence[str] = (),
    ) -> tuple[PullResult, tuple[HubRepo, dict | None] | None]:
        assert spec.path is not None
        listing = source.list_files()
        for note in listing.notes:
            self._event(spec.name, "warning", note, level="warning")
        files = check_listing(select_files(listing.files, spec.include, spec.exclude))
        if not files:
            raise InvalidInputError(
                f"no files to pull from {source.display_uri} (check include/exclude)")
        self._check_restricted(spec, source, files)
        total = sum(f.size for f in files)
        if spec.size_limit_gib is not None and total > spec.size_limit_gib * GIB:
            raise CapacityError(
                f"cache {spec.name!r} needs {total} bytes, over its size limit of"
                f" {spec.size_limit_gib} GiB"
            )
        verification = self._verification(spec.name, files) if scheme_is_remote(spec.source) else ""
        existing = self.store.file_rows(spec.name)
        evicted = self._make_room(spec.name, files, existing)
        self._update(spec.name, revision=listing.revision, files_total=len(files),
                     bytes_total=total, files_done=0, bytes_done=0, rate=0.0)
        # Files the origin no longer lists leave the view, then the database: a crash
        # in between leaves rows without links (an unfinished pull), never a view
        # file the database does not know.
        listed = {f.path for f in files}
        stale = sorted(existing.keys() - listed)
        self.store.views.prune(spec.bucket, spec.path, listed)
        if stale:
            self.store.forget_files(spec.name, stale)

        tracker = _Tracker(self, spec.name, len(files), total, on_progress)
        result = PullResult(view=self.store.views.dir(spec.bucket, spec.path), evicted=evicted,
                            verification=verification)
        counts_lock = threading.Lock()

        def pull_one(f: RemoteFile) -> None:
            fetched = self._pull_file(spec, source, f, existing.get(f.path), tracker)
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
        with ThreadPoolExecutor(self.settings.fetch_concurrency, "cachemesh-pull") as pool:
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

    def _check_restricted(self, spec: CacheSpec, source: Source, files: list[RemoteFile]) -> None:
        """Never make a local file that only some local users may read readable by all.

        Refused rather than copied with its restriction kept: a view file is a hardlink
        to a blob shared by every cache with those bytes (one inode, 0444), so what
        keeps others out is the folder of the view (store/buckets.py). A protected
        bucket's is 0700, and so is any bucket of a store that others cannot reach."""
        closed = [f.path for f in files if f.restricted]
        if not closed or not self.store.views.readable_by_all(spec.bucket):
            return
        root = getattr(source, "root", None)
        home = os.path.realpath(self.store.home)
        if isinstance(root, Path) and os.path.realpath(root).startswith(home + os.sep):
            return  # the store's own files (a conversion's output): check_source rules them
        shown = ", ".join(closed[:3]) + (f" and {len(closed) - 3} more" if len(closed) > 3 else "")
        raise ForbiddenError(
            f"cache {spec.name!r}: {source.display_uri} holds files that not every local user"
            f" may read ({shown}: their mode or a folder on their path keeps others out), and"
            f" a view in open bucket {spec.bucket!r} would make them readable by all. Pull"
            " into a protected bucket (cachemesh bucket protect NAME; its folder is 0700),"
            " or make the files readable (chmod o+r) if they are meant to be")

    def _verification(self, name: str, files: list[RemoteFile]) -> str:
        """What each file's bytes are checked against before they become visible.

        Returned for the "available" event; files with nothing but a size to
        check also get a warning event now.
        """
        kinds = {k: sum(1 for f in files if f.checksum_kind == k)
                 for k in ("sha256", "git-sha1", "md5", "size")}
        if kinds["size"]:
            self._event(name, "verification",
                        f"{kinds['size']} file(s) have no checksum at the origin; verified by"
                        " size only", level="warning")
        labels = {"sha256": "the sha256", "git-sha1": "the git blob id",
                  "md5": "the MD5 (ETag)", "size": "the size only"}
        parts = [f"{n} against {labels[k]}" for k, n in kinds.items() if n]
        return "verified: " + ", ".join(parts)

    def _pull_file(
        self, spec: CacheSpec, source: Source, f: RemoteFile, row: dict | None, tracker: _Tracker
    ) -> bool:
        """Make one file present in the cache. Returns True if bytes were fetched."""
        assert spec.path is not None
        add = self.store.add_file
        # Same origin version as an earlier, interrupted pull: relink, no fetch.
        if row is not None and row["size"] == f.size and row["origin_tag"] == f.origin_tag \
                and f.origin_tag is not None and (f.sha256 is None or row["sha256"] == f.sha256):
            if add(spec.name, spec.bucket, spec.path, f.path,
                   ref=BlobRef(row["sha256"], row["size"]), origin_tag=f.origin_tag):
                tracker.add_bytes(f.size, fetched=False)
                return False
        # The origin published a checksum we already hold: dedup, no fetch.
        if f.sha256 is not None and add(spec.name, spec.bucket, spec.path, f.path,
                                        ref=BlobRef(f.sha256, f.size), origin_tag=f.origin_tag):
            tracker.add_bytes(f.size, fetched=False)
            return False
        # A git blob id names bytes too: reuse a blob fetched under the same id.
        known = self._blob_for_git_sha1(f) if f.sha256 is None and f.git_sha1 else None
        if known is not None and add(spec.name, spec.bucket, spec.path, f.path,
                                     ref=known, origin_tag=f.origin_tag):
            tracker.add_bytes(f.size, fetched=False)
            return False
        for _ in range(3):
            ref = source.fetch(f, self.store, tracker.add_bytes)
            if ref.size != f.size:
                raise IntegrityError(f"{f.path}: the source listed {f.size} bytes, got {ref.size}")
            if f.sha256 is not None and ref.sha256 != f.sha256:
                raise IntegrityError(f"{f.path}: sha256 {ref.sha256} does not match {f.sha256}")
            if add(spec.name, spec.bucket, spec.path, f.path, ref=ref, origin_tag=f.origin_tag):
                return True
            # gc removed the fresh blob before we linked it: fetch again.
        raise ConflictError(f"{f.path}: the blob kept disappearing while being linked (gc running?)")

    def _blob_for_git_sha1(self, f: RemoteFile) -> BlobRef | None:
        """A stored blob whose git blob id is ``f.git_sha1`` (checked by hashing it)."""
        rows = self.db.query(
            "SELECT DISTINCT sha256 FROM files WHERE origin_tag = ? AND size = ?",
            (f.git_sha1, f.size),
        )
        for row in rows:
            digest = hashlib.sha1(b"blob %d\0" % f.size)
            try:
                with open(self.store.blobs.path(row["sha256"]), "rb") as blob:
                    while chunk := blob.read(1024 * 1024):
                        digest.update(chunk)
            except OSError:
                continue
            if digest.hexdigest() == f.git_sha1:
                return BlobRef(row["sha256"], f.size)
        return None

    def _make_room(self, name: str, files: list[RemoteFile], existing: dict[str, dict]) -> list[str]:
        """Evict LRU caches if the store limit or the disk cannot take the new bytes."""
        have = {r["sha256"] for r in existing.values()}
        need = sum(
            f.size for f in files
            if not (f.sha256 and (f.sha256 in have or self.store.blobs.has(f.sha256, f.size)))
            and not (f.path in existing and existing[f.path]["origin_tag"] == f.origin_tag)
        )
        physical = self.store.physical_bytes()
        disk = shutil.disk_usage(self.store.home)
        free_disk = disk.free - min(DISK_RESERVE_MAX, int(disk.total * DISK_RESERVE_SHARE))
        overflow = max(need - free_disk, 0)
        limit = self.settings.max_store_bytes
        if limit is not None:
            overflow = max(overflow, physical + need - limit)
        if overflow <= 0:
            return []
        plan = self._plan(exclude={name}, need=overflow, keep_blobs=have)
        if plan is None:
            where = f"the store limit of {limit} bytes" if limit is not None else "the free disk space"
            raise CapacityError(
                f"cache {name!r} needs {need} more bytes; {where} leaves no room even after"
                " evicting every cache that is neither pinned nor in use"
            )
        victims, _ = plan
        for victim in victims:
            self._event(name, "evicted", f"evicted cache {victim!r} to make room")
            self.rm(victim, reason=f"evicted to make room for {name!r}", collect=False)
        self.store.collect_blobs()
        return victims

    def _plan(self, exclude: set[str], need: int, keep_blobs: set[str]) -> tuple[list[str], int] | None:
        refs: dict[str, set[str]] = {}
        for r in self.db.query("SELECT cache, sha256 FROM files"):
            refs.setdefault(r["sha256"], set()).add(r["cache"])
        sizes = {r["sha256"]: r["size"] for r in self.db.query("SELECT sha256, size FROM blobs")}
        candidates = []
        for info in self.list():
            if info.name in exclude or info.pinned or info.in_use or self._pull_running(info.name):
                continue
            blobs = frozenset(b for b, owners in refs.items() if info.name in owners)
            candidates.append(Candidate(info.name, info.last_access, blobs))
        return plan_eviction(candidates, need, refs, sizes, keep_blobs)

    # -- removing ------------------------------------------------------------------

    def rm(self, name: str, *, force: bool = False, reason: str = "removed",
           collect: bool = True) -> None:
        """Remove a cache: its view, its rows, and blobs nobody else references."""
        row = self._row(name)
        repo = self._hub_repo_of(row["source"], json.loads(row["spec"]).get("options"))
        if not force and self.store.in_use(name):
            raise InUseError(f"cache {name!r} is in use by a running process (a loaded model?)")
        lock = self.store.lock("pull", name)
        if not lock.acquire(blocking=False):
            raise InUseError(f"cache {name!r} is being pulled; try again when the pull ends")
        try:
            # Mark first: a crash mid-way leaves a Deleting row that gc finishes.
            self._update(name, status=DELETING)
            self.store.views.remove(row["bucket"], row["path"])
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM caches WHERE name = ?", (name,))
                conn.execute("DELETE FROM events WHERE cache = ?", (name,))
        finally:
            lock.release()
        del reason
        if repo is not None:
            self._sync_hub(repo)
        if collect:
            self.store.collect_blobs()

    def recover(self) -> None:
        """Repair what a crashed process left: adopt verified blob files that
        lack their row, finish interrupted removals, and record interrupted
        pulls as Failed (a pull resumes them). Run at server start and by gc."""
        self.store.recover()
        for r in self.db.query("SELECT name FROM caches WHERE status = ?", (DELETING,)):
            self.rm(r["name"], force=True, collect=False)
        for r in self.db.query("SELECT name FROM caches WHERE status = ?", (LOADING,)):
            lock = self.store.lock("pull", r["name"])
            if lock.acquire(blocking=False):  # nobody is pulling it: its puller died
                try:
                    self._update(r["name"], status=FAILED,
                                 error="the pull was interrupted; pull again to resume it")
                finally:
                    lock.release()

    def gc(self, *, max_bytes: int | None = None, tmp_age_s: float = 24 * 3600) -> GcReport:
        """Finish interrupted removals, expire caches past retention, enforce the
        store limit (LRU, skipping pinned and in-use caches), drop unreferenced blobs."""
        report = GcReport()
        now = time.time()
        deleting = [r["name"] for r in self.db.query(
            "SELECT name FROM caches WHERE status = ?", (DELETING,))]
        self.recover()
        report.removed_caches.extend(deleting)
        for info in self.list():
            days = info.retention_days
            if days is None or info.pinned or info.in_use or self._pull_running(info.name):
                continue
            if now - info.last_access > days * 86400:
                self.rm(info.name, collect=False)
                report.removed_caches.append(info.name)
        count, freed = self.store.collect_blobs()
        report.blobs_removed += count
        report.bytes_freed += freed
        limit = max_bytes if max_bytes is not None else self.settings.max_store_bytes
        if limit is not None:
            overflow = self.store.physical_bytes() - limit
            if overflow > 0:
                plan = self._plan(exclude=set(), need=overflow, keep_blobs=set())
                # Without a full plan, still evict what can go, least recently used first.
                victims = plan[0] if plan else [c.name for c in sorted(
                    self._candidates(), key=lambda c: c.last_access)]
                for victim in victims:
                    self.rm(victim, collect=False)
                    report.removed_caches.append(victim)
                count, freed = self.store.collect_blobs()
                report.blobs_removed += count
                report.bytes_freed += freed
        # Bring every repo folder of hub/ in line (after a crash in the middle of a sync).
        for repo in {*self._hub_repos().values(), *map(_repo_of_folder, self.hub.folders())}:
            if repo is not None:
                self._sync_hub(repo)
        report.tmp_bytes_freed = self.store.collect_tmp(tmp_age_s)
        return report

    def _candidates(self) -> list[CacheInfo]:
        return [i for i in self.list()
                if not (i.pinned or i.in_use or self._pull_running(i.name))]

    # -- checking --------------------------------------------------------------------

    def verify(self, name: str | None = None, *, rehash: bool = True) -> list[Problem]:
        """Every inconsistency of the store (or of cache ``name``) and of ``hub/``.

        A file row whose view link is missing is what a pull leaves between the two
        (rows come first, so the view never shows a file the database does not know):
        in a cache that is not Available that is an unfinished pull, which pulling again
        completes, not a problem. In an Available cache it is one."""
        unfinished = {r["name"] for r in self.db.query(
            "SELECT name FROM caches WHERE status != ?", (AVAILABLE,))}
        if name is None:
            found = self.store.verify(rehash=rehash) + self._verify_hub(None)
        else:
            row = self._row(name)
            mine = {r["sha256"] for r in self.store.file_rows(name).values()}
            found = [p for p in self.store.verify([row], rehash=rehash)
                     if p.cache == name or (p.cache is None and p.subject in mine)
                     ] + self._verify_hub(name)
        return [p for p in found if not (p.kind == "missing-file" and p.cache in unfinished)]

    # -- the Hugging Face layout view (hub/) -------------------------------------

    def _hub_repo_of(self, source: str, options: dict | None) -> HubRepo | None:
        try:
            return parse_source(source, options or {}, self.settings).hub_repo()
        except CachemeshError:
            return None

    def _hub_repos(self, only: str | None = None) -> dict[str, HubRepo]:
        """Available caches that show files under hub/ -> their repo (ref dropped)."""
        repos: dict[str, HubRepo] = {}
        protected = self.buckets.protected()
        for row in self.db.query("SELECT name, bucket, source, spec, status FROM caches"):
            if row["status"] != AVAILABLE or (only is not None and row["name"] != only):
                continue
            if row["bucket"] in protected:
                continue
            repo = self._hub_repo_of(row["source"], json.loads(row["spec"]).get("options"))
            if repo is not None:
                repos[row["name"]] = HubRepo(repo.repo_type, repo.repo_id)
        return repos

    def _hub_claims(self, repo: HubRepo, including: str | None = None,
                    hide: frozenset[str] = frozenset()) -> list[HubClaim]:
        """What each Available cache of ``repo`` (and ``including``) shows in its folder;
        caches of protected buckets (and of ``hide``) show nothing."""
        claims = []
        hidden = self.buckets.protected() | hide
        for row in self.db.query(
                "SELECT name, bucket, source, spec, status, revision FROM caches"):
            name = row["name"]
            if (row["status"] != AVAILABLE and name != including) or not row["revision"]:
                continue
            if row["bucket"] in hidden:
                continue
            mine = self._hub_repo_of(row["source"], json.loads(row["spec"]).get("options"))
            if mine is None or (mine.repo_type, mine.repo_id) != (repo.repo_type, repo.repo_id):
                continue
            files = {path: HubFile(self.store.blobs.path(r["sha256"]), r["origin_tag"] or "")
                     for path, r in self.store.file_rows(name).items()}
            pulled = self.db.query(
                "SELECT MAX(ts) AS ts FROM events WHERE cache = ? AND kind = 'available'", (name,))
            pulled_at = time.time() if name == including else (pulled[0]["ts"] or 0.0)
            claims.append(HubClaim(row["revision"], mine.ref, files, pulled_at))
        return claims

    def _sync_hub(self, repo: HubRepo, *, including: str | None = None,
                  trees: dict[str, Any] | None = None, hide: frozenset[str] = frozenset()) -> None:
        """Make the repo's folder show its claims. A commit's tree, as the Hub listed it
        at pull time, is kept in meta.db (``hub_trees``): a folder that comes back (a
        bucket unprotected, gc repairing it) gets its trees again without the origin."""
        with self.store.lock("hub", repo.folder), self.store.blob_lock(shared=True):
            claims = self._hub_claims(repo, including, hide)
            self._keep_trees(repo, trees or {})
            self.hub.sync(repo, claims, self._kept_trees(repo, {c.commit for c in claims}))

    def _keep_trees(self, repo: HubRepo, trees: dict[str, Any]) -> None:
        """Record new trees; forget those of commits no cache of the repo holds (any
        bucket, any status: a protected cache's tree is needed when it is shown again)."""
        held = {r["revision"] for r in self.db.query(
                    "SELECT source, spec, revision FROM caches WHERE revision IS NOT NULL")
                if _same_repo(self._hub_repo_of(r["source"], json.loads(r["spec"]).get(
                    "options")), repo)}
        with self.db.transaction() as conn:
            for commit, entries in trees.items():
                doc = json.dumps({p: e.to_json() for p, e in sorted(entries.items())})
                conn.execute('INSERT OR REPLACE INTO hub_trees (folder, "commit", tree)'
                             " VALUES (?, ?, ?)", (repo.folder, commit, doc))
            for row in conn.execute('SELECT "commit" FROM hub_trees WHERE folder = ?',
                                    (repo.folder,)).fetchall():
                if row[0] not in held and row[0] not in trees:
                    conn.execute('DELETE FROM hub_trees WHERE folder = ? AND "commit" = ?',
                                 (repo.folder, row[0]))

    def _kept_trees(self, repo: HubRepo, commits: set[str]) -> dict[str, dict[str, TreeEntry]]:
        out = {}
        for row in self.db.query('SELECT "commit", tree FROM hub_trees WHERE folder = ?',
                                 (repo.folder,)):
            if row["commit"] in commits:
                out[row["commit"]] = {p: TreeEntry(**e) for p, e in json.loads(row["tree"]).items()}
        return out

    def _sync_hub_quietly(self, name: str, repo: HubRepo | None) -> None:
        if repo is None:
            return
        try:
            self._sync_hub(repo)
        except CachemeshError as exc:
            self._event(name, "warning", f"could not update the hub view: {exc}", level="warning")

    def _verify_hub(self, name: str | None) -> list[Problem]:
        repos = self._hub_repos(name)
        problems: list[Problem] = []
        for repo in {r.folder: r for r in repos.values()}.values():
            problems.extend(self.hub.verify(repo, self._hub_claims(repo)))
        if name is None:
            claimed = {r.folder for r in repos.values()}
            for folder in self.hub.folders():
                if folder not in claimed:
                    problems.append(Problem("hub-stray", f"hub/{folder}",
                                            "repo folder that no cache claims"))
        return problems

    def du(self) -> dict[str, Any]:
        """Logical bytes (what the views show) against physical bytes (the blobs)."""
        per_cache = []
        refs: dict[str, int] = {}
        for r in self.db.query("SELECT sha256, COUNT(DISTINCT cache) AS n FROM files GROUP BY sha256"):
            refs[r["sha256"]] = r["n"]
        for info in self.list():
            rows = self.store.file_rows(info.name).values()
            logical = sum(r["size"] for r in rows)
            unique = {r["sha256"]: r["size"] for r in rows if refs.get(r["sha256"]) == 1}
            per_cache.append({"name": info.name, "bucket": info.bucket, "files": len(rows),
                              "logical_bytes": logical, "exclusive_bytes": sum(unique.values())})
        logical = sum(c["logical_bytes"] for c in per_cache)
        physical = self.store.physical_bytes()
        return {
            "caches": per_cache,
            "logical_bytes": logical,
            "physical_bytes": physical,
            "saved_bytes": logical - physical,
            "blobs": len(refs),
            "home": str(self.store.home),
        }


def _same_repo(a: HubRepo | None, b: HubRepo) -> bool:
    return a is not None and (a.repo_type, a.repo_id) == (b.repo_type, b.repo_id)


def _repo_of_folder(folder: str) -> HubRepo | None:
    """``models--org--name`` -> the repo, or None for a name that is not a repo folder."""
    kind, sep, rest = folder.partition("s--")
    try:
        return HubRepo(kind, rest.replace("--", "/")) if sep else None
    except CachemeshError:
        return None


def make_spec(**fields: Any) -> CacheSpec:
    """Build a :class:`CacheSpec`, turning validation errors into one clear message."""
    from pydantic import ValidationError

    try:
        return CacheSpec(**fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "spec"
            msg = str(err.get("ctx", {}).get("error") or err["msg"])
            problems.append(f"{where}: {msg}")
        raise InvalidInputError("invalid cache spec: " + "; ".join(problems)) from None


def scheme_is_remote(uri: str) -> bool:
    from .sources import scheme_of

    return scheme_of(uri) != "file"


def pull(source: str, **options: Any) -> Path:
    """Pull ``source`` into the local cache and return its view directory.

    Options: ``name``, ``bucket``, ``path``, ``include``, ``exclude``,
    ``size_limit_gib``, ``retention_days``, ``refresh``, ``on_progress``,
    ``settings``, and source options (``endpoint_url``, ``sha256``,
    ``follow_symlinks``, …). An existing cache of the same name and spec is
    reused (and resumed if an earlier pull was interrupted).
    """
    settings = options.pop("settings", None) or Settings.from_env()
    refresh = bool(options.pop("refresh", False))
    on_progress = options.pop("on_progress", None)
    spec_fields = {k: options.pop(k) for k in list(options) if k in CacheSpec.model_fields
                   and k not in ("source", "options")}
    caches = Caches(settings)
    src = parse_source(source, options, settings)
    spec_fields.setdefault("name", src.default_name())
    spec = make_spec(source=source, options=options, **spec_fields)
    return caches.ensure(spec, refresh=refresh, on_progress=on_progress).view
