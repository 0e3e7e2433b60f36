"""The Hugging Face layout view (hub/) kept in step with the caches by pull, rm, gc
and checked by verify (caches/hub_sync.py); the writer on its own is in
tests/store/test_hub_layout.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import FAILED, Caches
from cachemesh.errors import IntegrityError, UnsafePathError
from cachemesh.store.hub_layout import HubRepo
from tests.emulators.hf_hub import HfHubEmulator

C1 = "1" * 40


def test_concurrent_pulls_of_one_repo_leave_one_consistent_view(hub_caches: Caches,
                                                                hf_env: HfHubEmulator, repo_id):
    import threading

    files = {f"shard-{i}.safetensors": os.urandom(20_000) for i in range(4)}
    files["config.json"] = b"{}"
    commit = hf_env.commit(repo_id, files)
    errors: list[BaseException] = []

    def pull(name: str, include: list[str]) -> None:
        try:
            cachemesh.pull(f"hf://{repo_id}", name=name, include=include,
                           settings=hub_caches.settings)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(f"part{i}", [f"shard-{i}*", "*.json"]))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    snapshot = hub_caches.settings.home / "hub" / ("models--" + repo_id.replace("/", "--"))
    assert sorted(os.listdir(snapshot / "snapshots" / commit)) == sorted(files)
    assert hub_caches.verify() == []


def test_verify_gc_and_a_failed_refresh_keep_the_view_in_step(hub_caches: Caches,
                                                             hf_env: HfHubEmulator, repo_id):
    commit = hf_env.commit(repo_id, {"config.json": b"{}", "w.safetensors": b"W" * 4000})
    s = hub_caches.settings
    view = cachemesh.pull(f"hf://{repo_id}", settings=s)
    folder = s.home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (folder / "snapshots" / commit / "config.json").unlink()
    ghost = s.home / "hub/models--org--ghost/snapshots" / C1
    ghost.mkdir(parents=True)
    (ghost / "x").write_text("left over")
    problems = {(p.kind, p.subject) for p in hub_caches.verify()}
    assert ("hub-missing-file", f"hub/{folder.name}/snapshots/{commit}/config.json") in problems
    assert ("hub-stray", "hub/models--org--ghost") in problems
    assert [p.kind for p in hub_caches.verify(view.name)] == ["hub-missing-file"]
    hub_caches.gc()
    assert hub_caches.verify() == []
    assert (folder / "snapshots" / commit / "config.json").read_bytes() == b"{}"
    assert not (s.home / "hub/models--org--ghost").exists()

    # A refresh that fails leaves the cache Failed; the hub view shows Available caches only.
    new = os.urandom(3000)
    hf_env.commit(repo_id, {"w.safetensors": new})
    hf_env.corrupt(hashlib.sha256(new).hexdigest())
    with pytest.raises(IntegrityError):
        hub_caches.pull(view.name, refresh=True)
    assert hub_caches.get(view.name).status == FAILED
    assert not folder.exists()
    hf_env.corrupted.clear()
    hf_env.blob_origin.corrupted.clear()
    hub_caches.pull(view.name)
    assert (folder / "refs/main").read_text() == hub_caches.get(view.name).revision


def _tree_file(hub_caches: Caches, repo_id: str) -> Path:
    folder = hub_caches.hub.repo_dir(HubRepo("model", repo_id))
    (tree,) = (folder / "trees").glob("*.json")
    return tree


def test_protecting_and_unprotecting_a_bucket_keeps_the_commit_tree(
        hub_caches: Caches, hf_env: HfHubEmulator, repo_id):
    """Issue 22, item 10: protect hides the repo folder, unprotect shows it again, and
    the commit's tree comes back with it (it used to be lost: hub-missing-tree for ever,
    which gc did not repair). gc also rewrites a tree removed behind cachemesh's back."""
    hf_env.commit(repo_id, {"config.json": b"{}", "w.safetensors": b"W" * 5000,
                            "left-out.txt": b"x"})
    cachemesh.pull(f"hf://{repo_id}", name="shown", settings=hub_caches.settings,
                   include=["*.json", "*.safetensors"])
    tree = _tree_file(hub_caches, repo_id)
    doc = tree.read_bytes()
    assert "left-out.txt" in json.loads(doc)["files"]  # the whole commit, as always

    hub_caches.protect_bucket("default")
    assert not tree.parent.parent.exists()
    hub_caches.unprotect_bucket("default")
    assert tree.read_bytes() == doc
    assert hub_caches.verify() == []

    tree.unlink()
    assert [p.kind for p in hub_caches.verify()] == ["hub-missing-tree"]
    hub_caches.gc()
    assert tree.read_bytes() == doc
    assert hub_caches.verify() == []


def test_paths_with_empty_and_dot_segments_are_normalised_at_listing_time(
        hub_caches: Caches, hf_env: HfHubEmulator, repo_id):
    """A mirror listing ``a//c.json`` or ``./a/./b.json`` (item 10): the view, the
    snapshot and the tree all use the normal form, so verify passes."""
    hf_env.commit(repo_id, {"a//c.json": b"[]", "./a/./b.json": b"{}", "config.json": b"{}"})
    view = cachemesh.pull(f"hf://{repo_id}", name="dots", settings=hub_caches.settings,
                          exclude=["*b.json"])  # (the emulator serves only what it lists)
    assert (view / "a" / "c.json").read_bytes() == b"[]"
    assert json.loads(_tree_file(hub_caches, repo_id).read_text())["files"].keys() == {
        "a/c.json", "a/b.json", "config.json"}
    assert hub_caches.verify() == []
    # A listed path that escapes is refused before anything is written, filtered out or not.
    hf_env.commit(f"{repo_id}-up", {"../up.json": b"{}", "config.json": b"{}"})
    with pytest.raises(UnsafePathError, match="'..' is not allowed"):
        cachemesh.pull(f"hf://{repo_id}-up", name="up", settings=hub_caches.settings,
                       exclude=["up.json"])
    assert not hub_caches.exists("up")
