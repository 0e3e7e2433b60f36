"""meta.db locked by another process (``BEGIN EXCLUSIVE`` held by a plain sqlite3 client).

Writers wait for the lock (SQLite's busy timeout, ``CACHEMESH_DB_BUSY_TIMEOUT``)
and go on when it is released; past the timeout they fail with a clear error
naming the database and the lock (exit 1, no traceback). Either way nothing is
half-written: ``verify`` passes and a later pull completes the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    CLI,
    ServeProcess,
    cli,
    infer,
    toy_model_dir,
    toy_option,
    wait_for,
)

# Holds an exclusive write transaction on the database for argv[2] seconds.
LOCKER = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
""")


def hold_lock(home: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(home / "meta.db"), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    d = tmp_path / "origin"
    d.mkdir()
    for i in range(4):
        (d / f"w{i}.bin").write_bytes(os.urandom(512 * 1024))
    return d


def test_a_pull_waits_for_the_lock_then_succeeds(home: Path, origin: Path, figures: dict):
    assert cli(home, "cache", "ls").returncode == 0  # the store exists
    locker = hold_lock(home, 2.0)
    started = time.monotonic()
    out = cli(home, "pull", str(origin), "--name", "m")
    waited = time.monotonic() - started
    figures["lock_held_s"] = 2.0
    figures["pull_took_s"] = waited
    locker.wait(10)
    assert out.returncode == 0, out.stderr
    assert waited >= 1.5  # it waited for the lock rather than failing
    assert sorted(p.name for p in (home / "buckets/default/m").iterdir()) == [
        f"w{i}.bin" for i in range(4)]
    verify = cli(home, "cache", "verify")
    assert verify.returncode == 0 and "ok" in verify.stderr, verify.stdout


def test_past_the_busy_timeout_a_clear_error_and_nothing_half_done(home: Path, origin: Path,
                                                                  figures: dict):
    assert cli(home, "cache", "ls").returncode == 0
    locker = hold_lock(home, 4.0)
    started = time.monotonic()
    out = cli(home, "pull", str(origin), "--name", "m", env={"CACHEMESH_DB_BUSY_TIMEOUT": "1"})
    figures["failed_after_s"] = time.monotonic() - started
    figures["error"] = out.stderr.strip().splitlines()[-1][:160]
    assert time.monotonic() - started < 3.5  # gave up after its timeout, not the lock's end
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "meta.db is locked by another process" in out.stderr, out.stderr
    locker.wait(10)
    assert not (home / "buckets/default/m").exists()
    ls = cli(home, "cache", "ls", "--json")
    assert ls.returncode == 0 and '"m"' not in ls.stdout
    assert cli(home, "cache", "verify").returncode == 0
    assert cli(home, "pull", str(origin), "--name", "m").returncode == 0
    assert cli(home, "cache", "verify").returncode == 0


@pytest.mark.slow
def test_locked_mid_pull_past_the_timeout_leaves_it_resumable(home: Path, origin: Path):
    env = {**os.environ, "CACHEMESH_HOME": str(home), "FAULT_SLOW_READ": "0.2",
           "CACHEMESH_FETCH_CONCURRENCY": "1", "CACHEMESH_DB_BUSY_TIMEOUT": "1"}
    pull = subprocess.Popen([sys.executable, "-c", CLI, "pull", str(origin), "--name", "m"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    view = home / "buckets/default/m"
    wait_for(lambda: view.is_dir() and any(view.iterdir()), 60, "the first file")
    locker = hold_lock(home, 3.0)
    _, err = pull.communicate(timeout=60)
    locker.wait(10)
    assert pull.returncode == 1, err
    assert "Traceback" not in err and "locked by another process" in err, err
    landed = {p.name for p in view.iterdir()}
    assert 1 <= len(landed) < 4
    assert not list((home / "tmp").rglob("*.part"))
    status = cli(home, "cache", "status", "m")
    assert "Failed" in status.stdout, status.stdout  # resumable: "pull again"
    assert cli(home, "cache", "verify").returncode == 0
    again = cli(home, "pull", str(origin), "--name", "m")
    assert again.returncode == 0, again.stderr
    assert len(list(view.iterdir())) == 4
    verify = cli(home, "cache", "verify")
    assert verify.returncode == 0 and "ok" in verify.stderr, verify.stdout


@pytest.mark.slow
def test_a_deploy_waiting_on_a_locked_database_does_not_stall_the_server(home: Path,
                                                                         tmp_path: Path, servers):
    served = toy_model_dir(tmp_path / "origin", "served")
    extra = toy_model_dir(tmp_path / "origin", "extra")
    server = ServeProcess(home, [toy_option("served", served)],
                          env={"CACHEMESH_SERVE_SOURCE_ROOTS": str(tmp_path / "origin")})
    servers.append(server)
    server.wait_live()
    assert infer(server, "served").status_code == 200
    locker = hold_lock(home, 3.0)
    answers: dict = {}

    def deploy() -> None:
        answers["deploy"] = server.client.post("/api/v1/models", json={
            "name": "extra", "source": str(extra), "runtime": "custom",
            "parameters": {"class": "toy:Echo"}})

    thread = threading.Thread(target=deploy)
    thread.start()
    time.sleep(0.3)  # the deploy is waiting for the lock now
    started = time.monotonic()
    live = server.client.get("/v2/health/live")
    answered = infer(server, "served")
    stalled = time.monotonic() - started
    thread.join(30)
    locker.wait(10)
    assert live.status_code == 200 and answered.status_code == 200
    assert answers["deploy"].status_code == 201  # it waited, then went through
    assert stalled < 1.0, f"probes and inference waited {stalled:.1f} s for the lock"
