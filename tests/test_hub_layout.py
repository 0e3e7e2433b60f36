"""The Hugging Face layout view (hub/): the writer on its own, then kept in step
with the caches by pull, rm, gc and checked by verify."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import FAILED, Caches
from cachemesh.errors import IntegrityError, UnsafePathError
from cachemesh.store.hub_layout import HubClaim, HubFile, HubLayout, HubRepo, TreeEntry
from tests.emulators.hf_hub import HfHubEmulator

C1, C2 = "1" * 40, "2" * 40


def blob(tmp_path: Path, data: bytes) -> HubFile:
    sha = hashlib.sha256(data).hexdigest()
    path = tmp_path / "store" / sha
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
        path.chmod(0o444)
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return HubFile(path, sha if data.startswith(b"LFS") else git)


def tree(files: dict[str, HubFile]) -> dict[str, TreeEntry]:
    return {p: TreeEntry(f.blob.stat().st_size, "0" * 40) for p, f in files.items()}


def walk(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if not p.is_dir()}


def test_sync_writes_the_layout_and_removes_what_no_claim_shows(tmp_path: Path):
    layout = HubLayout(tmp_path)
    repo = HubRepo("model", "org/m", "main")
    first = {"config.json": blob(tmp_path, b"{}"), "w/model.safetensors": blob(tmp_path, b"LFS1")}
    layout.sync(repo, [HubClaim(C1, "main", first, 1.0)], {C1: tree(first)})
    folder = tmp_path / "hub/models--org--m"
    assert (folder / "refs/main").read_text() == C1
    for rel, f in first.items():
        assert os.path.samefile(folder / "snapshots" / C1 / rel, f.blob)
        assert os.path.samefile(folder / "blobs" / f.etag, f.blob)
    doc = json.loads((folder / f"trees/{C1}.json").read_text())
    assert doc == {"format_version": 1, "files": {p: e.to_json() for p, e in tree(first).items()}}
    assert not [p for p in walk(folder).values() if p.is_symlink()]
    assert layout.verify(repo, [HubClaim(C1, "main", first, 1.0)]) == []

    # A later pull of main at a new commit takes the branch; a commit pin keeps the old snapshot.
    second = {"config.json": first["config.json"], "w/model.safetensors": blob(tmp_path, b"LFS2")}
    claims = [HubClaim(C1, None, first, 1.0), HubClaim(C2, "main", second, 2.0),
              HubClaim(C1, "refs/pr/1", first, 1.5)]
    layout.sync(repo, claims, {C2: tree(second)})
    assert (folder / "refs/main").read_text() == C2
    assert (folder / "refs/refs/pr/1").read_text() == C1
    assert sorted(os.listdir(folder / "snapshots")) == [C1, C2]
    assert layout.verify(repo, claims) == []

    layout.sync(repo, claims[1:2])
    assert sorted(os.listdir(folder / "snapshots")) == [C2]
    assert sorted(walk(folder / "blobs")) == sorted(f.etag for f in second.values())
    assert sorted(walk(folder / "trees")) == [f"{C2}.json"]
    assert sorted(walk(folder / "refs")) == ["main"]
    layout.sync(repo, [])
    assert not folder.exists()


def test_verify_names_every_kind_of_damage(tmp_path: Path):
    layout = HubLayout(tmp_path)
    repo = HubRepo("dataset", "org/d", "v1")
    files = {"a.txt": blob(tmp_path, b"a"), "b/c.txt": blob(tmp_path, b"c"),
             "d.bin": blob(tmp_path, b"LFSd")}
    claims = [HubClaim(C1, "v1", files, 1.0)]
    layout.sync(repo, claims, {C1: tree(files)})
    folder = tmp_path / "hub/datasets--org--d"
    snap = folder / "snapshots" / C1
    (snap / "a.txt").unlink()
    (snap / "b/c.txt").unlink()
    shutil.copyfile(files["b/c.txt"].blob, snap / "b/c.txt")  # a copy, not the store's blob
    (snap / "d.bin").unlink()
    (snap / "d.bin").symlink_to(files["d.bin"].blob)  # a symlink out of the view
    (snap / "stray.txt").write_text("?")
    (folder / "refs/v1").write_text(C2)
    (folder / f"trees/{C1}.json").write_text("{not json")
    found = {(p.kind, p.subject.rsplit("/", 1)[-1]) for p in layout.verify(repo, claims)}
    assert found == {
        ("hub-missing-file", "a.txt"), ("hub-unlinked-file", "c.txt"),
        ("hub-unlinked-file", "d.bin"), ("hub-stray", "stray.txt"), ("hub-bad-ref", "v1"),
        ("hub-missing-tree", f"{C1}.json"),
    }
    layout.sync(repo, claims, {C1: tree(files)})
    assert layout.verify(repo, claims) == []


@pytest.mark.parametrize("make", [
    lambda t: HubRepo("model", "org/../x"),
    lambda t: HubRepo("model", "org/a--b"),
    lambda t: HubRepo("space", "org/a"),
    lambda t: HubRepo("model", "org/a", "../../etc"),
    lambda t: HubLayout(t).sync(HubRepo("model", "org/a"), [HubClaim(C1, None, {
        "../escape": blob(t, b"x")})]),
])
def test_names_that_could_escape_are_refused(tmp_path: Path, make):
    with pytest.raises((UnsafePathError, ValueError)):
        make(tmp_path)


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
                          exclude=["b.json"])  # (the emulator serves only what it lists)
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
