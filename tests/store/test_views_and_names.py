import os
from pathlib import Path

import pytest

from cachemesh.errors import UnsafePathError
from cachemesh.store.names import check_name, check_relpath
from cachemesh.store.views import Views


@pytest.mark.parametrize("bad", ["..", "../x", "a/../../b", "a\\b", "a\x00b", "a\nb", "", "/", ".", "/etc/passwd"])
def test_relpaths_that_could_escape_are_refused(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relpath(bad)


@pytest.mark.parametrize("raw,clean", [("/models/qwen", "models/qwen"), ("a//b/./c", "a/b/c")])
def test_relpaths_are_normalised(raw: str, clean: str) -> None:
    assert check_relpath(raw, absolute_ok=True) == clean


@pytest.mark.parametrize("bad", ["", "..", ".hidden", "a/b", "a b", "x" * 129, "-x"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        check_name(bad)


def test_place_links_atomically_and_prune_removes_strays(tmp_path: Path) -> None:
    views = Views(tmp_path)
    blob = tmp_path / "blob"
    blob.write_bytes(b"data")
    target = views.place("b", "m/x", "dir/file.bin", blob)
    assert os.path.samefile(target, blob)
    assert target == tmp_path / "buckets/b/m/x/dir/file.bin"
    views.place("b", "m/x", "dir/file.bin", blob)  # idempotent
    stray = target.parent / "stray"
    stray.write_bytes(b"?")
    assert views.prune("b", "m/x", {"dir/file.bin"}) == ["dir/stray"]
    assert views.prune("b", "m/x", set()) == ["dir/file.bin"]
    assert not (tmp_path / "buckets/b/m/x/dir").exists()


def test_place_refuses_to_write_through_a_symlinked_directory(tmp_path: Path) -> None:
    views = Views(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "buckets/b/m").mkdir(parents=True)
    os.symlink(outside, tmp_path / "buckets/b/m/dir")
    blob = tmp_path / "blob"
    blob.write_bytes(b"data")
    with pytest.raises(UnsafePathError):
        views.place("b", "m", "dir/file", blob)
    assert list(outside.iterdir()) == []
