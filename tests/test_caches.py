"""The DataCache lifecycle against local and in-memory origins."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import AVAILABLE, FAILED, Caches, make_spec
from cachemesh.config import Settings
from cachemesh.errors import (
    CapacityError,
    ConflictError,
    IntegrityError,
    InUseError,
    InvalidInputError,
    SourceError,
    SourceNotFoundError,
    UnsafePathError,
)
from tests import fakes
from tests.conftest import model_files


def tree_of(view: Path) -> dict[str, bytes]:
    return {str(p.relative_to(view)): p.read_bytes() for p in view.rglob("*") if p.is_file()}


def test_pull_local_dir_gives_a_view_of_hardlinked_read_only_blobs(caches, make_tree, settings):
    files = model_files()
    origin = make_tree("tiny", files)
    view = cachemesh.pull(str(origin), name="tiny", settings=settings)
    assert view == settings.home / "buckets/default/tiny"
    assert tree_of(view) == files
    for rel in files:
        st = (view / rel).stat()
        assert st.st_mode & 0o222 == 0
        sha = hashlib.sha256(files[rel]).hexdigest()
        assert os.path.samefile(view / rel, caches.store.blobs.path(sha))
    info = caches.get("tiny")
    assert info.status == AVAILABLE
    assert info.progress.files_done == info.progress.files_total == len(files)
    assert info.progress.bytes_done == sum(map(len, files.values()))
    kinds = [e.kind for e in caches.events("tiny")]
    assert kinds == ["created", "pull-started", "available"]
    assert [e.ts for e in caches.events("tiny")] == sorted(e.ts for e in caches.events("tiny"))


def test_identical_files_across_caches_are_stored_once(caches, make_tree, settings):
    base = model_files(seed=1)
    tuned = {**base, "weights/shard-00.bin": os.urandom(64 * 1024)}
    cachemesh.pull(str(make_tree("base", base)), settings=settings)
    cachemesh.pull(str(make_tree("tuned", tuned)), settings=settings)
    cachemesh.pull(str(make_tree("base", base)), name="base-again", bucket="other", settings=settings)
    du = caches.du()
    logical = 2 * sum(map(len, base.values())) + sum(map(len, tuned.values()))
    physical = sum(map(len, base.values())) + 64 * 1024
    assert du["logical_bytes"] == logical
    assert du["physical_bytes"] == physical
    assert len(caches.store.blobs.files_on_disk()) == len(base) + 1


def test_include_and_exclude(caches, make_tree, settings):
    origin = make_tree("m", model_files())
    view = cachemesh.pull(str(origin), include=["*.json", "weights/*"], exclude=["shard-01*"],
                          settings=settings)
    assert sorted(tree_of(view)) == ["config.json", "tokenizer.json", "weights/shard-00.bin",
                                     "weights/shard-02.bin"]


def test_spec_conflict_and_overlapping_paths_are_refused(caches, make_tree, settings):
    a = make_tree("a", {"f": b"1"})
    b = make_tree("b", {"f": b"2"})
    cachemesh.pull(str(a), name="m", path="models/m", settings=settings)
    with pytest.raises(ConflictError, match="different spec"):
        cachemesh.pull(str(b), name="m", path="models/m", settings=settings)
    with pytest.raises(ConflictError, match="overlaps"):
        cachemesh.pull(str(b), name="n", path="models/m/sub", settings=settings)
    with pytest.raises(ConflictError, match="overlaps"):
        cachemesh.pull(str(b), name="n", path="models", settings=settings)
    assert [c.name for c in caches.list()] == ["m"]


@pytest.mark.parametrize("field,value", [
    ("name", "../etc"), ("bucket", "a/b"), ("path", "../../x"), ("path", "a\\b"),
    ("size_limit_gib", -1),
])
def test_bad_spec_is_refused_before_anything_is_written(caches, make_tree, settings, field, value):
    origin = make_tree("m", {"f": b"1"})
    kwargs = {"name": "ok", field: value}
    with pytest.raises(InvalidInputError):
        cachemesh.pull(str(origin), settings=settings, **kwargs)
    assert caches.list() == []
    assert not any(caches.store.views.root.iterdir())


def test_missing_and_unreadable_sources(caches, tmp_path, settings):
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        cachemesh.pull(str(tmp_path / "nope"), settings=settings)
    with pytest.raises(InvalidInputError, match="unknown source scheme"):
        cachemesh.pull("gopher://x/y", settings=settings)
    assert caches.list() == []


def test_cache_size_limit_fails_cleanly_and_leaves_others_intact(caches, make_tree, settings):
    small = make_tree("small", {"a": b"x" * 1000})
    big = make_tree("big", {"b": os.urandom(2 * 1024 * 1024)})
    cachemesh.pull(str(small), settings=settings)
    with pytest.raises(CapacityError, match="size limit"):
        cachemesh.pull(str(big), size_limit_gib=1 / 1024, settings=settings)  # 1 MiB
    assert not caches.exists("big")  # a one-shot pull that fails leaves nothing
    # A declared cache (as the control API makes them) stays, Failed, with the reason.
    caches.create(make_spec(name="big", source=str(big), size_limit_gib=1 / 1024))
    with pytest.raises(CapacityError):
        caches.pull("big")
    assert caches.get("big").status == FAILED
    assert "size limit" in caches.get("big").error
    assert tree_of(Path(caches.get("big").view)) == {}
    assert caches.get("small").status == AVAILABLE
    assert caches.store.blobs.files_on_disk().keys() == {hashlib.sha256(b"x" * 1000).hexdigest()}


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


def test_refresh_follows_changes_at_the_origin(caches, make_tree, settings):
    origin = make_tree("m", {"a": b"1", "sub/b": b"2"})
    view = cachemesh.pull(str(origin), settings=settings)
    (origin / "sub/b").unlink()
    (origin / "c").write_bytes(b"3")
    assert tree_of(cachemesh.pull(str(origin), settings=settings)) == {"a": b"1", "sub/b": b"2"}
    assert tree_of(cachemesh.pull(str(origin), refresh=True, settings=settings)) == {"a": b"1", "c": b"3"}
    assert not (view / "sub").exists()


def test_hostile_local_tree_never_leads_outside(caches, make_tree, tmp_path, settings):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not copy")
    origin = make_tree("hostile", {"ok.bin": b"fine", "inner/real.bin": b"inner"})
    os.symlink(secret, origin / "abs-link")
    os.symlink("../../secret.txt", origin / "rel-escape")
    os.symlink("inner/real.bin", origin / "inside-link")
    os.symlink(tmp_path, origin / "dir-escape")
    os.symlink(".", origin / "inner" / "loop")
    (origin / "back\\slash").write_bytes(b"x")
    view = cachemesh.pull(str(origin), settings=settings)
    assert tree_of(view) == {"ok.bin": b"fine", "inner/real.bin": b"inner",
                             "inside-link": b"inner"}
    notes = " ".join(e.message for e in caches.events("hostile") if e.kind == "warning")
    for name in ("abs-link", "rel-escape", "dir-escape", "back\\\\slash", "loop"):
        assert name in notes
    assert b"do not copy" not in b"".join(
        p.read_bytes() for p in caches.store.blobs.root.rglob("*") if p.is_file())


def test_hostile_names_from_an_origin_are_refused(caches, settings):
    for i, name in enumerate(["../../x", "/etc/passwd", "a\\b", "a\x00b", "ok/../../x"]):
        fakes.ORIGINS[f"h{i}"] = fakes.Origin({"fine": b"1", name: b"evil"})
        with pytest.raises(UnsafePathError):
            cachemesh.pull(f"mem://h{i}", settings=settings)
    assert caches.list() == []
    assert caches.store.blobs.files_on_disk() == {}
    assert not (caches.store.home.parent / "x").exists()


def test_origin_checksum_dedups_before_fetching(caches, settings):
    files = model_files(seed=3)
    fakes.ORIGINS["one"] = fakes.Origin(dict(files))
    fakes.ORIGINS["two"] = fakes.Origin(dict(files))
    cachemesh.pull("mem://one", settings=settings)
    cachemesh.pull("mem://two", settings=settings)
    assert sum(fakes.ORIGINS["one"].served.values()) == sum(map(len, files.values()))
    assert sum(fakes.ORIGINS["two"].served.values()) == 0


def test_checksum_mismatch_is_caught_and_never_visible(caches, settings):
    fakes.ORIGINS["liar"] = fakes.Origin({"good": b"good", "bad": b"bad bytes"}, lie_sha256={"bad"})
    caches.create(make_spec(name="liar", source="mem://liar"))
    with pytest.raises(IntegrityError):
        caches.pull("liar")
    info = caches.get("liar")
    assert info.status == FAILED and "sha256" in info.error
    assert "bad" not in tree_of(Path(info.view))


def test_failed_pull_resumes_without_refetching_finished_files(caches, settings):
    files = model_files(seed=4, n=4)
    origin = fakes.ORIGINS["flaky"] = fakes.Origin(dict(files),
                                                   fail_after={"weights/shard-03.bin": 1000})
    with pytest.raises(SourceError, match="cut"):
        cachemesh.pull("mem://flaky", settings=settings)
    view = Path(caches.get("flaky").view)
    landed = tree_of(view)
    assert "weights/shard-03.bin" not in landed  # no partial file is visible
    assert landed and all(files[p] == data for p, data in landed.items())
    origin.fail_after.clear()
    opened_before = dict(origin.opened)
    cachemesh.pull("mem://flaky", settings=settings)
    assert tree_of(view) == files
    reopened = {p for p in files if origin.opened[p] > opened_before.get(p, 0)}
    # Files that landed before are not fetched again.
    assert reopened == files.keys() - landed.keys()
    assert "weights/shard-03.bin" in reopened


def test_make_spec_errors_are_readable():
    with pytest.raises(InvalidInputError, match=r"name: .*invalid cache name"):
        make_spec(name="../x", source="/tmp")
