"""The Hugging Face layout view (hub/), the writer on its own (store/hub_layout.py);
tests/caches/test_hub_sync.py keeps it in step with the caches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cachemesh.errors import UnsafePathError
from cachemesh.store.hub_layout import HubClaim, HubFile, HubLayout, HubRepo, TreeEntry

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
