"""Pulling caches from local and in-memory origins: views, dedup, filters, limits,
hostile trees and names, checksums, resume."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import AVAILABLE, FAILED, make_spec
from cachemesh.errors import (
    CapacityError,
    IntegrityError,
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
    view = cachemesh.pull(str(origin), include=["*.json", "weights/*"], exclude=["weights/shard-01*"],
                          settings=settings)
    assert sorted(tree_of(view)) == ["config.json", "tokenizer.json", "weights/shard-00.bin",
                                     "weights/shard-02.bin"]


def test_include_and_exclude_match_as_huggingface_hub_does():
    """Users copy these lists from snapshot_download(allow_patterns=..., ignore_patterns=...):
    the full path only, and a pattern ending in "/" takes the folder's files."""
    from huggingface_hub.utils import filter_repo_objects

    from cachemesh.caches import select_files
    from cachemesh.sources.base import RemoteFile

    paths = ["config.json", "1_Pooling/config.json", "1_Pooling/extra/x.bin",
             "model.safetensors", "onnx/model.onnx", "onnx/model_O4.onnx", "README.md",
             "tokenizer.json", "2_Dense/config.json", "1_Pooling"]
    cases = [(["config.json"], []), (["1_Pooling/"], []), (["1_Pooling"], []),
             (["*.json"], ["1_Pooling/*"]), (["*"], ["onnx/"]), ([], ["*.onnx"]),
             (["onnx/*.onnx"], ["*O4*"]), (["*/config.json"], []), (["[12]_*/"], ["*/extra/"]),
             (["?_Pooling/config.json", "README.md"], []), ([], [])]
    files = [RemoteFile(path=p, size=1) for p in paths]
    for include, exclude in cases:
        ours = [f.path for f in select_files(files, include, exclude)]
        theirs = list(filter_repo_objects(paths, allow_patterns=include or None,
                                          ignore_patterns=exclude or None))
        assert ours == theirs, (include, exclude)
    # What the old rule (also the file name) took, and no longer does.
    assert [f.path for f in select_files(files, ["config.json"], [])] == ["config.json"]
    assert [f.path for f in select_files(files, ["1_Pooling/"], [])] == [
        "1_Pooling/config.json", "1_Pooling/extra/x.bin"]


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


def test_a_pull_parses_its_source_once(caches, make_tree, settings, monkeypatch):
    """One parse of the URI serves the declaration, the pull and the hub view."""
    import importlib

    from cachemesh.sources import parse_source

    parsed: list[str] = []

    def counting(uri, *args, **kwargs):
        parsed.append(uri)
        return parse_source(uri, *args, **kwargs)

    for name in ("pull", "facade", "hub_sync"):  # the package's modules that parse
        monkeypatch.setattr(importlib.import_module(f"cachemesh.caches.{name}"),
                            "parse_source", counting)
    origin = make_tree("once", model_files())
    cachemesh.pull(str(origin), settings=settings)
    assert parsed == [str(origin)]
    parsed.clear()
    cachemesh.pull(str(origin), refresh=True, settings=settings)  # declared already
    assert parsed == [str(origin)]
