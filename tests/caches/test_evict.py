"""Removing caches: rm, gc (retention, the store limit) and eviction to make room."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import cachemesh
from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.errors import CapacityError, InUseError


def test_store_limit_evicts_lru_unpinned_unused(make_tree, clean_env):
    mib = 1024 * 1024
    settings = Settings.from_env(max_store_bytes=int(3.5 * mib))
    caches = Caches(settings)
    for name in ("a", "b", "c"):
        cachemesh.pull(str(make_tree(name, {"w": os.urandom(mib)})), settings=settings)
        time.sleep(0.01)
    caches.pin("a")
    caches.touch("b")  # now c is the least recently used unpinned cache
    cachemesh.pull(str(make_tree("d", {"w": os.urandom(mib)})), settings=settings)
    assert sorted(c.name for c in caches.list()) == ["a", "b", "d"]
    assert any(e.kind == "evicted" and "'c'" in e.message for e in caches.events("d"))
    # Nothing can go (a pinned, b and d in use): a new pull fails cleanly.
    with caches.open("b"), caches.open("d"):
        with pytest.raises(CapacityError, match="store limit"):
            cachemesh.pull(str(make_tree("e", {"w": os.urandom(2 * mib)})), settings=settings)
    assert sorted(c.name for c in caches.list()) == ["a", "b", "d"]
    assert caches.store.physical_bytes() <= settings.max_store_bytes
    assert caches.verify() == []


def test_rm_frees_only_unreferenced_blobs_and_refuses_in_use(caches, make_tree, settings):
    shared = os.urandom(1000)
    cachemesh.pull(str(make_tree("a", {"s": shared, "x": b"only a"})), settings=settings)
    cachemesh.pull(str(make_tree("b", {"s": shared})), settings=settings)
    # Another process holds cache a open (as a server with a loaded model would).
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from cachemesh.caches import Caches; c = Caches();\n"
         "with c.open('a'):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert caches.get("a").in_use
        with pytest.raises(InUseError):
            caches.rm("a")
        assert caches.gc(max_bytes=0).removed_caches == ["b"]
    finally:
        holder.kill()
        holder.wait()
    assert not caches.get("a").in_use
    caches.rm("a")
    assert caches.list() == []
    assert caches.store.blobs.files_on_disk() == {}
    assert not (settings.home / "buckets/default/a").exists()


def test_gc_expires_caches_past_retention(caches, make_tree, settings):
    cachemesh.pull(str(make_tree("old", {"f": b"1"})), retention_days=1, settings=settings)
    cachemesh.pull(str(make_tree("keep", {"f": b"2"})), retention_days=1, settings=settings)
    with caches.db.transaction() as conn:
        conn.execute("UPDATE caches SET last_access = ?", (time.time() - 2 * 86400,))
    caches.pin("keep")
    report = caches.gc()
    assert report.removed_caches == ["old"]
    assert report.blobs_removed == 1
    assert [c.name for c in caches.list()] == ["keep"]
