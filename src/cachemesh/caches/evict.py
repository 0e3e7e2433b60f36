"""Removing caches: on request (rm), to make room for a pull, by gc, and after a crash.

A cache that is pinned, in use by a running process (a loaded model) or being
pulled is never evicted; among the others the least recently used go first, and
only as many as free the bytes needed (``store/quota.py`` plans which). Removal
marks the row Deleting before it touches the disk, so a crash part-way leaves a
row that :func:`recover` finishes.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from ..errors import CapacityError, InUseError
from ..sources import RemoteFile
from ..store.quota import Candidate, plan_eviction
from .cluster_copies import forget_copy, kept_for_cluster
from .spec import DELETING, FAILED, INTERRUPTED, LOADING, CacheInfo, GcReport

if TYPE_CHECKING:
    from .facade import Caches

# Keep this much of the disk free when planning a pull (2% of it, at most 256 MiB).
DISK_RESERVE_MAX = 256 * 1024**2
DISK_RESERVE_SHARE = 0.02


def remove(caches: Caches, name: str, *, force: bool = False, collect: bool = True) -> None:
    """Remove a cache: its view, its rows, and blobs nobody else references."""
    row = caches.row(name)
    repo = caches.hub_sync.repo_of(row)
    if not force and caches.store.in_use(name):
        raise InUseError(f"cache {name!r} is in use by a running process (a loaded model?)")
    lock = caches.store.lock("pull", name)
    if not lock.acquire(blocking=False):
        raise InUseError(f"cache {name!r} is being pulled; try again when the pull ends")
    try:
        # Mark first: a crash mid-way leaves a Deleting row that gc finishes.
        caches.catalog.update(name, status=DELETING)
        caches.store.views.remove(row["bucket"], row["path"])
        caches.catalog.delete(name)
    finally:
        lock.release()
    if repo is not None:
        caches.hub_sync.sync(repo)
    if collect:
        caches.store.collect_blobs()


def recover(caches: Caches) -> None:
    """Repair what a crashed process left: adopt verified blob files that lack their
    row, finish interrupted removals, and record interrupted pulls as Failed."""
    caches.store.recover()
    for name in caches.catalog.names(DELETING):
        remove(caches, name, force=True, collect=False)
    for name in caches.catalog.names(LOADING):
        lock = caches.store.lock("pull", name)
        if lock.acquire(blocking=False):  # nobody is pulling it: its puller died
            try:
                caches.catalog.update(name, status=FAILED, error=INTERRUPTED)
            finally:
                lock.release()


def gc(caches: Caches, *, max_bytes: int | None = None,
       tmp_age_s: float = 24 * 3600) -> GcReport:
    """Finish interrupted removals, expire caches past retention, enforce the store
    limit (LRU, skipping pinned and in-use caches), drop unreferenced blobs."""
    report = GcReport()
    now = time.time()
    deleting = caches.catalog.names(DELETING)
    recover(caches)
    report.removed_caches.extend(deleting)
    expired = [info.name for info in caches.list()
               if info.retention_days is not None
               and not (info.pinned or info.in_use or caches.pull_running(info.name))
               and now - info.last_access > info.retention_days * 86400]
    kept = kept_for_cluster(caches, expired)  # the last min_copies copies stay
    for name in expired:
        if name not in kept:
            _evict(caches, name)
            report.removed_caches.append(name)
    count, freed = caches.store.collect_blobs()
    report.blobs_removed += count
    report.bytes_freed += freed
    limit = max_bytes if max_bytes is not None else caches.settings.max_store_bytes
    if limit is not None:
        overflow = caches.store.physical_bytes() - limit
        if overflow > 0:
            plan = _plan(caches, exclude=set(), need=overflow, keep_blobs=set())
            # Without a full plan, still evict what can go, least recently used first.
            victims = plan[0] if plan else [c.name for c in sorted(
                _candidates(caches), key=lambda c: c.last_access)]
            for victim in victims:
                _evict(caches, victim)
                report.removed_caches.append(victim)
            count, freed = caches.store.collect_blobs()
            report.blobs_removed += count
            report.bytes_freed += freed
    caches.hub_sync.repair()
    report.tmp_bytes_freed = caches.store.collect_tmp(tmp_age_s)
    return report


def make_room(caches: Caches, name: str, files: list[RemoteFile],
              existing: dict[str, dict]) -> list[str]:
    """Evict LRU caches if the store limit or the disk cannot take the new bytes."""
    store = caches.store
    have = {r["sha256"] for r in existing.values()}
    need = sum(
        f.size for f in files
        if not (f.sha256 and (f.sha256 in have or store.blobs.has(f.sha256, f.size)))
        and not (f.path in existing and existing[f.path]["origin_tag"] == f.origin_tag)
    )
    physical = store.physical_bytes()
    disk = shutil.disk_usage(store.home)
    free_disk = disk.free - min(DISK_RESERVE_MAX, int(disk.total * DISK_RESERVE_SHARE))
    overflow = max(need - free_disk, 0)
    limit = caches.settings.max_store_bytes
    if limit is not None:
        overflow = max(overflow, physical + need - limit)
    if overflow <= 0:
        return []
    plan = _plan(caches, exclude={name}, need=overflow, keep_blobs=have)
    if plan is None:
        where = f"the store limit of {limit} bytes" if limit is not None else "the free disk space"
        raise CapacityError(
            f"cache {name!r} needs {need} more bytes; {where} leaves no room even after"
            " evicting every cache that is neither pinned nor in use"
        )
    victims, _ = plan
    for victim in victims:
        caches.catalog.add_event(name, "evicted", f"evicted cache {victim!r} to make room")
        _evict(caches, victim)
    store.collect_blobs()
    return victims


def _plan(caches: Caches, exclude: set[str], need: int,
          keep_blobs: set[str]) -> tuple[list[str], int] | None:
    refs = caches.catalog.blob_owners()
    sizes = caches.catalog.blob_sizes()
    candidates = []
    for info in _candidates(caches):
        if info.name in exclude:
            continue
        blobs = frozenset(b for b, owners in refs.items() if info.name in owners)
        candidates.append(Candidate(info.name, info.last_access, blobs))
    return plan_eviction(candidates, need, refs, sizes, keep_blobs)


def _candidates(caches: Caches) -> list[CacheInfo]:
    """Caches eviction may take: neither pinned, nor in use, nor being pulled, nor one of
    the last min_copies copies of a cache declared cluster-wide (cluster_copies.py)."""
    found = [i for i in caches.list()
             if not (i.pinned or i.in_use or caches.pull_running(i.name))]
    kept = kept_for_cluster(caches, [i.name for i in found])
    return [i for i in found if i.name not in kept]


def _evict(caches: Caches, victim: str) -> None:
    """Remove a cache to make room; in cluster mode the others stop counting this copy."""
    remove(caches, victim, collect=False)
    forget_copy(caches, victim)
