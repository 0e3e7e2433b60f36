"""The store's private folders are private from the moment they exist (issue 22, item 4)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from cachemesh.cli import main


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_fresh_store_makes_every_private_folder_0700_on_its_first_pull(
        tmp_path: Path, make_tree: Callable[[str, dict[str, bytes]], Path]):
    origin = make_tree("m", {"a.bin": b"a" * 100, "sub/b.bin": b"b" * 10})
    home = tmp_path / "fresh"
    old = os.umask(0o022)  # the usual umask: what is not asked for private comes out 0755
    try:
        runner = CliRunner()
        r = runner.invoke(main, ["--home", str(home), "bucket", "protect", "team-a"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(main, ["--home", str(home), "pull", str(origin), "--name", "secret-m",
                                 "--bucket", "team-a"])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    # The lock of the pull is named after the protected cache.
    assert (home / "locks" / "pull" / "secret-m.lock").exists()
    opened = []
    for top in ("blobs", "tmp", "locks"):
        assert _mode(home / top) == 0o700, top
        for dirpath, dirnames, filenames in os.walk(home / top):
            for name in dirnames:
                if _mode(Path(dirpath, name)) & 0o077:
                    opened.append(str(Path(dirpath, name).relative_to(home)))
            if top == "locks":
                opened += [str(Path(dirpath, n).relative_to(home)) for n in filenames
                           if _mode(Path(dirpath, n)) & 0o077]
    assert not opened, opened
    for db in home.glob("meta.db*"):
        assert _mode(db) == 0o600, db
    assert _mode(home / "buckets" / "team-a") == 0o700
