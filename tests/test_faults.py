"""Faults during a pull: a killed process, a full disk, two pullers at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cachemesh
from cachemesh.caches import AVAILABLE, FAILED, Caches
from cachemesh.cli import main
from cachemesh.config import Settings
from cachemesh.errors import CapacityError

# A pull in its own process, from a slow origin (each read sleeps), so a test
# can kill it in the middle of a file.
SLOW_PULL = textwrap.dedent("""
    import sys, time
    from cachemesh.sources import local
    real_open = local.LocalSource.open
    class Slow:
        def __init__(self, f): self.f = f
        def readinto(self, b):
            time.sleep(0.02)
            return self.f.readinto(memoryview(b)[:256 * 1024])
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
    local.LocalSource.open = lambda self, file: Slow(real_open(self, file))
    import cachemesh
    print(cachemesh.pull(sys.argv[1], name=sys.argv[2]), flush=True)
""")


def start_slow_pull(origin: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "CACHEMESH_FETCH_CONCURRENCY": "2"}
    return subprocess.Popen([sys.executable, "-c", SLOW_PULL, str(origin), name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_mid_pull_then_restart_resumes_and_no_partial_file_is_visible(make_tree, clean_env):
    files = {f"shard-{i:02d}.bin": os.urandom(1024 * 1024) for i in range(12)}
    origin = make_tree("big", files)
    view = clean_env / "buckets/default/big"
    proc = start_slow_pull(origin, "big")
    wait_for(lambda: view.is_dir() and len(list(view.iterdir())) >= 3)
    wait_for(lambda: any((clean_env / "tmp").glob("*.part")))  # mid-file
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    caches = Caches(Settings.from_env())
    landed = {p.name: p.read_bytes() for p in view.iterdir()}
    assert 3 <= len(landed) < len(files)
    for name, data in landed.items():  # every visible file is whole and verified
        assert data == files[name]
    info = caches.get("big")
    assert info.status == FAILED and "interrupted" in info.error
    # A kill between linking a blob and writing its row leaves a verified blob
    # file without a row; recovery (run at start-up and by gc) adopts it.
    caches.recover()
    assert caches.verify() == []

    result = caches.pull("big")
    assert result.files_reused >= len(landed)
    assert result.files_fetched == len(files) - result.files_reused
    assert {p.name: p.read_bytes() for p in view.iterdir()} == files
    assert caches.get("big").status == AVAILABLE
    assert caches.verify() == []
    caches.gc(tmp_age_s=0)
    assert not list((clean_env / "tmp").glob("*.part"))


# A pull killed (SIGKILL, by itself) right after the row of its Nth file is committed
# and before that file's link appears in the view.
KILLED_BETWEEN_ROW_AND_LINK = textwrap.dedent("""
    import os, signal, sys
    from cachemesh.store import views
    real_place = views.Views.place
    calls = []
    def place(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_place(self, *args, **kwargs)
    views.Views.place = place
    import cachemesh
    print(cachemesh.pull(sys.argv[1], name=sys.argv[2]), flush=True)
""")


def test_verify_passes_right_after_a_pull_killed_between_a_row_and_its_link(
        make_tree, clean_env):
    """Issue 22, item 11: a kill between a file's row and its view link used to leave
    `cache verify` failing ("missing-file") until the cache was pulled again. A row
    without its link in a cache that is not Available is an unfinished pull."""
    files = {f"f{i:02d}.bin": os.urandom(64 * 1024 + i) for i in range(6)}
    origin = make_tree("killed", files)
    env = {**os.environ, "CACHEMESH_FETCH_CONCURRENCY": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_ROW_AND_LINK, str(origin),
                           "killed", "4"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    caches = Caches(Settings.from_env())
    rows = caches.store.file_rows("killed")
    view = Path(caches.get("killed").view)
    linked = {p.name for p in view.iterdir()}
    assert len(rows) == 4 and len(linked) == 3  # the fourth row has no link yet
    assert caches.get("killed").status == FAILED
    assert caches.verify() == [] and caches.verify("killed") == []  # no recovery needed
    cli = CliRunner().invoke(main, ["cache", "verify"])
    assert cli.exit_code == 0, cli.output
    # An Available cache whose link went missing is still a problem.
    result = caches.pull("killed")
    assert result.files_reused == 4 and result.files_fetched == 2
    assert {p.name: p.read_bytes() for p in view.iterdir()} == files
    (view / "f00.bin").unlink()
    assert [p.kind for p in caches.verify("killed")] == ["missing-file"]
    caches.pull("killed", refresh=True)
    assert caches.verify() == []


@pytest.mark.slow
def test_two_processes_pulling_one_cache_do_it_once(make_tree, clean_env):
    files = {f"f{i}.bin": os.urandom(256 * 1024) for i in range(6)}
    origin = make_tree("m", files)
    procs = [start_slow_pull(origin, "m") for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    caches = Caches(Settings.from_env())
    events = [e.kind for e in caches.events("m")]
    assert events.count("pull-started") == 1  # the second waited, then found it Available
    assert caches.verify() == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs as the store's disk (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.mount
def test_full_disk_evicts_lru_or_fails_cleanly(small_disk, make_tree):
    settings = Settings.from_env(home=small_disk / "home")
    caches = Caches(settings)
    mib = 1024 * 1024
    cachemesh.pull(str(make_tree("a", {"w": os.urandom(6 * mib)})), settings=settings)
    cachemesh.pull(str(make_tree("b", {"w": os.urandom(6 * mib)})), settings=settings)
    # c does not fit next to a and b: the least recently used (a) is evicted.
    cachemesh.pull(str(make_tree("c", {"w": os.urandom(6 * mib)})), settings=settings)
    assert sorted(c.name for c in caches.list()) == ["b", "c"]
    caches.pin("b")
    caches.pin("c")
    with pytest.raises(CapacityError):
        cachemesh.pull(str(make_tree("d", {"w": os.urandom(6 * mib)})), settings=settings)
    assert sorted(c.name for c in caches.list()) == ["b", "c"]
    assert not list((small_disk / "home/tmp").glob("*.part"))
    assert caches.verify() == []


@pytest.mark.mount
def test_disk_filling_up_mid_pull_fails_cleanly(small_disk, make_tree, monkeypatch):
    settings = Settings.from_env(home=small_disk / "home")
    caches = Caches(settings)
    # Someone else fills the disk after the pull planned its space.
    from cachemesh.caches import evict

    real = evict.make_room

    def then_fill(*a, **kw):
        out = real(*a, **kw)
        (small_disk / "filler").write_bytes(os.urandom(12 * 1024 * 1024))
        return out

    monkeypatch.setattr(evict, "make_room", then_fill)
    with pytest.raises(CapacityError, match="full"):
        cachemesh.pull(str(make_tree("x", {"w": os.urandom(6 * 1024 * 1024)})), settings=settings)
    assert not list((small_disk / "home/tmp").glob("*.part"))
    assert caches.list() == []
    assert caches.verify() == []
