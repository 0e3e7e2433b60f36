"""Caches: the DataCache lifecycle of one store (declare, pull, report, use, evict,
remove), as one object that the CLI, the server and the loader hold.

It reads and answers; the work is in its modules: ``pull.py`` (pulling),
``evict.py`` (removal, gc, making room), ``hub_sync.py`` (the ``hub/`` view),
``guard.py`` (what a local source may be), ``catalog.py`` (every row, every SQL
statement). A cache is a named set of files from one source, shown as a view
directory ``buckets/<bucket>/<path>``; its statuses are drawn in ``spec.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import CacheNotFoundError, ConflictError
from ..sources import Source, parse_source
from ..store import CORRUPT_EVENT, Problem, Store
from ..store.hub_layout import HubLayout
from ..store.names import check_name
from . import evict, guard
from .catalog import CacheCatalog
from .cluster_copies import forget_copy
from .hub_sync import HubSync
from .pull import ensure, pull_running, run_pull
from .spec import (
    AVAILABLE,
    DELETING,
    FAILED,
    INTERRUPTED,
    LOADING,
    CacheInfo,
    CacheSpec,
    Event,
    GcReport,
    Progress,
    PullResult,
)


class Caches:
    """The caches of one store. Safe to use from several threads and processes."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.store = Store(self.settings.home, busy_timeout=self.settings.db_busy_timeout_s)
        self.db = self.store.db
        self.catalog = CacheCatalog(self.db)
        self.hub = HubLayout(self.store.home)
        self.buckets = self.store.buckets
        self.hub_sync = HubSync(self.catalog, self.store, self.hub, self.settings)
        # Cheap and idempotent: repairs modes that a crash or an older cachemesh left open.
        self.buckets.secure()

    # -- reading -----------------------------------------------------------------

    def row(self, name: str) -> dict[str, Any]:
        """Cache ``name``'s catalog row; CacheNotFoundError if there is none."""
        row = self.catalog.row(check_name(name, "cache name"))
        if row is None:
            raise CacheNotFoundError(name)
        return row

    def _info(self, row: dict[str, Any]) -> CacheInfo:
        spec = json.loads(row["spec"])
        status = row["status"]
        if status == LOADING and not self.pull_running(row["name"]):
            # The process that ran the pull died; say so, and let a pull resume it.
            status = FAILED
            row["error"] = row["error"] or INTERRUPTED
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
        return self._info(self.row(name))

    def list(self, bucket: str | None = None) -> list[CacheInfo]:
        return [self._info(r) for r in self.catalog.rows(bucket) if r["status"] != DELETING]

    def exists(self, name: str) -> bool:
        return self.catalog.exists(name)

    def pull_running(self, name: str) -> bool:
        return pull_running(self, name)

    def integrity(self, name: str) -> dict[str, tuple[str, int, float]]:
        """The cache's files: path in its view -> the blob's sha256, size and commit time,
        what a model load checks its files against (load/integrity.py)."""
        return self.catalog.integrity(check_name(name))

    def mark_corrupt(self, sha256: str, detail: str) -> list[str]:
        """Record that a load found blob ``sha256`` changed since it was committed: an
        error event on every cache that holds it (one write, every view: the blob is
        shared); ``verify --quick`` then re-hashes it (Store.verify). Returns those caches."""
        return self.catalog.add_event_to_holders(
            sha256, CORRUPT_EVENT,
            f"blob sha256:{sha256} does not match its sha256 (found by a load: {detail})")

    def events(self, name: str, after: int = 0, limit: int = 1000) -> list[Event]:
        self.row(name)
        return [Event(**r) for r in self.catalog.events(name, after, limit)]

    def view(self, name: str) -> Path:
        row = self.row(name)
        return self.store.views.dir(row["bucket"], row["path"])

    def du(self) -> dict[str, Any]:
        """Logical bytes (what the views show) against physical bytes (the blobs)."""
        refs = {sha256: len(owners) for sha256, owners in self.catalog.blob_owners().items()}
        per_cache = []
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

    def verify(self, name: str | None = None, *, rehash: bool = True) -> list[Problem]:
        """Every inconsistency of the store (or of cache ``name``) and of ``hub/``.

        A file row whose view link is missing is what a pull leaves between the two
        (rows come first, so the view never shows a file the database does not know):
        in a cache that is not Available that is an unfinished pull, which pulling again
        completes, not a problem. In an Available cache it is one."""
        unfinished = {n for n, status in self.catalog.statuses().items() if status != AVAILABLE}
        if name is None:
            found = self.store.verify(rehash=rehash) + self.hub_sync.verify(None)
        else:
            row = self.row(name)
            mine = {r["sha256"] for r in self.store.file_rows(name).values()}
            found = [p for p in self.store.verify([row], rehash=rehash)
                     if p.cache == name or (p.cache is None and p.subject in mine)
                     ] + self.hub_sync.verify(name)
        return [p for p in found if not (p.kind == "missing-file" and p.cache in unfinished)]

    # -- declaring and using -------------------------------------------------------

    def create(self, spec: CacheSpec, *, source: Source | None = None) -> CacheInfo:
        """Declare a cache (status Pending). An identical declaration is a no-op.
        ``source``: ``spec.source`` already parsed, if the caller has it."""
        if source is None:
            source = parse_source(spec.source, spec.options, self.settings)
        self.check_source(source, spec.bucket)
        canonical = spec.model_copy(update={"source": source.uri})
        stored = json.loads(json.dumps(canonical.model_dump()))
        assert spec.path is not None
        row = self.catalog.declare(spec.name, spec.bucket, spec.path, source.display_uri,
                                   stored, f"cache created from {source.display_uri}")
        if row is not None:
            if json.loads(row["spec"]) != stored:
                raise ConflictError(
                    f"cache {spec.name!r} exists with a different spec (source {row['source']});"
                    " remove it first or choose another name"
                )
            return self._info(row)
        return self.get(spec.name)

    def check_source(self, source: Source, bucket: str,
                     roots: tuple[Path, ...] | None = None) -> None:
        """See :func:`cachemesh.caches.guard.check_source`."""
        guard.check_source(self.store, source, bucket, roots)

    def touch(self, name: str) -> None:
        self.catalog.touch(name)

    def pin(self, name: str, pinned: bool = True) -> CacheInfo:
        self.row(name)
        self.catalog.update(name, pinned=int(pinned))
        kind = "pinned" if pinned else "unpinned"
        self.catalog.add_event(name, kind, kind)
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

    # -- pulling (pull.py) -------------------------------------------------------

    def ensure(self, spec: CacheSpec, *, refresh: bool = False,
               on_progress: Callable[[Progress], None] | None = None,
               first: Sequence[str] = (), source: Source | None = None) -> PullResult:
        """See :func:`cachemesh.caches.pull.ensure`."""
        return ensure(self, spec, source=source, refresh=refresh, on_progress=on_progress,
                      first=first)

    def pull(self, name: str, *, refresh: bool = False,
             on_progress: Callable[[Progress], None] | None = None,
             first: Sequence[str] = ()) -> PullResult:
        """See :func:`cachemesh.caches.pull.run_pull`."""
        return run_pull(self, name, refresh=refresh, on_progress=on_progress, first=first)

    # -- removing (evict.py) -----------------------------------------------------

    def rm(self, name: str, *, force: bool = False, collect: bool = True) -> None:
        """Remove a cache: its view, its rows, and blobs nobody else references. In
        cluster mode this node's prewarm entry of it goes too (the others stop counting
        this copy, and a cache declared again under the name shows no stale entry), and
        so do its entries in the blob index for the blobs removed (peers stop asking)."""
        cluster = self.settings.cluster.enabled
        held = {sha for sha, _, _ in self.catalog.integrity(name).values()} if cluster else set()
        evict.remove(self, name, force=force, collect=collect)
        forget_copy(self, name, collected=[s for s in held if not self.store.blobs.has(s)])

    def recover(self) -> None:
        """Repair what a crashed process left: adopt verified blob files that
        lack their row, finish interrupted removals, and record interrupted
        pulls as Failed (a pull resumes them). Run at server start and by gc."""
        evict.recover(self)

    def gc(self, *, max_bytes: int | None = None, tmp_age_s: float = 24 * 3600) -> GcReport:
        """See :func:`cachemesh.caches.evict.gc`."""
        return evict.gc(self, max_bytes=max_bytes, tmp_age_s=tmp_age_s)

    # -- protected buckets (store/buckets.py) --------------------------------------

    def protect_bucket(self, bucket: str, token: str | None = None) -> str:
        """Protect ``bucket``: its folder private, its caches out of ``hub/``, a token
        to see them over the API. Returns the token (made here unless given)."""

        def hide_from_hub() -> None:  # before the row: the disk is never more open
            for repo in self.hub_sync.repos_of_bucket(bucket):
                self.hub_sync.sync(repo, hide=frozenset({bucket}))

        return self.buckets.protect(bucket, token, before_commit=hide_from_hub)

    def rotate_bucket_token(self, bucket: str, token: str | None = None) -> str:
        return self.buckets.rotate(bucket, token)

    def unprotect_bucket(self, bucket: str) -> None:
        self.buckets.unprotect(bucket)
        for repo in self.hub_sync.repos_of_bucket(bucket):
            self.hub_sync.sync(repo)

    def bucket_list(self) -> list[dict[str, Any]]:
        """Every bucket that holds caches or is protected: name, protected, caches."""
        counts = self.catalog.bucket_counts()
        protected = self.buckets.protected()
        return [{"name": b, "protected": b in protected, "caches": counts.get(b, 0)}
                for b in sorted(counts.keys() | protected)]
