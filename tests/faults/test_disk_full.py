"""The disk fills up in the middle of a pull (someone else writes to it).

tests/test_faults.py covers the space a pull plans for (eviction, a clear
CapacityError before anything is written) and a single-file pull refused. Here
several files land before the disk is full: the pull stops with an error that
names the cache and the full disk (exit code 5, no traceback), no partial file
is visible anywhere, the cache reads Failed and resumable, and once space is
freed a new process resumes it (reusing what landed) and ``verify`` passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.faults.conftest import CLI, cli, fill, wait_for

MIB = 1024 * 1024


@pytest.mark.mount
@pytest.mark.slow
def test_disk_full_mid_pull_fails_cleanly_and_resumes(small_disk: Path, tmp_path: Path,
                                                      figures: dict):
    home = small_disk / "home"
    origin = tmp_path / "origin"
    origin.mkdir()
    files = {f"w{i}.bin": os.urandom(3 * MIB) for i in range(5)}
    for name, data in files.items():
        (origin / name).write_bytes(data)
    view = home / "buckets/default/m"

    env = {**os.environ, "CACHEMESH_HOME": str(home), "FAULT_SLOW_READ": "0.1",
           "CACHEMESH_FETCH_CONCURRENCY": "1"}
    pull = subprocess.Popen([sys.executable, "-c", CLI, "pull", str(origin), "--name", "m"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: view.is_dir() and any(view.iterdir()), 60, "the first file")
    filler = threading.Thread(target=fill, args=(small_disk / "filler",))
    filler.start()
    filling = time.monotonic()
    _, err = pull.communicate(timeout=60)
    figures["error_after_disk_filled_s"] = time.monotonic() - filling
    filler.join()

    assert pull.returncode == 5, err  # CapacityError
    assert "Traceback" not in err
    assert "cache 'm'" in err and "is full" in err, err
    landed = {p.name: p.read_bytes() for p in view.iterdir()}
    assert 1 <= len(landed) < len(files)
    figures["files_landed"] = f"{len(landed)}/{len(files)}"
    figures["error"] = err.strip().splitlines()[-1][:160]
    assert all(files[name] == data for name, data in landed.items())  # whole or absent
    assert not list((home / "tmp").rglob("*.part"))  # the partial file went with the error
    status = cli(home, "cache", "status", "m")
    assert status.returncode == 0 and "Failed" in status.stdout, status.stdout

    (small_disk / "filler").unlink()
    assert cli(home, "cache", "verify").returncode == 0
    again = cli(home, "pull", str(origin), "--name", "m")  # a new process resumes it
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in view.iterdir()} == files
    verify = cli(home, "cache", "verify")
    assert verify.returncode == 0 and "ok" in verify.stderr, verify.stdout
    status = cli(home, "cache", "status", "m", "--json")
    assert '"status": "Available"' in status.stdout
    figures["resume"] = [e["message"] for e in json.loads(status.stdout)["events"]
                         if e["kind"] == "available"][-1]


@pytest.mark.mount
def test_pull_onto_a_full_disk_is_a_clear_error(small_disk: Path, tmp_path: Path):
    home = small_disk / "home"
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "w.bin").write_bytes(os.urandom(MIB))
    assert cli(home, "cache", "ls").returncode == 0  # the store exists, then the disk fills
    fill(small_disk / "filler")
    out = cli(home, "pull", str(origin), "--name", "m")
    assert out.returncode == 5, out.stderr
    assert "Traceback" not in out.stderr and "full" in out.stderr, out.stderr
    (small_disk / "filler").unlink()
    assert not (home / "buckets/default/m").exists()
    assert not list((home / "tmp").rglob("*.part"))
    verify = cli(home, "cache", "verify")
    assert verify.returncode == 0, verify.stdout
    assert cli(home, "pull", str(origin), "--name", "m").returncode == 0
    assert cli(home, "cache", "verify").returncode == 0
