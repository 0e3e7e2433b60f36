"""SIGKILL of ``cachemesh serve`` in the middle of a pull and of a model load.

After each kill: the workers die with the server (none is left holding memory
or files), nothing half-written is visible in the cache's view, and a restart
on the same store brings the model up, the cache Available and ``cachemesh
cache verify`` clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.faults.conftest import (
    ServeProcess,
    assert_verify_ok,
    cli,
    infer,
    toy_model_dir,
    toy_option,
    wait_for,
)

MIB = 1024 * 1024


def cache_status(home: Path, name: str) -> dict:
    out = cli(home, "cache", "status", name, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_gone(procs: list[psutil.Process], timeout: float = 10) -> None:
    """Every process in ``procs`` has exited (workers die with their server)."""
    def gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)

    wait_for(gone, timeout, "the workers of the killed server to exit")


@pytest.mark.slow
def test_sigkill_during_a_pull_then_restart_resumes_it(home: Path, tmp_path: Path, servers,
                                                       figures: dict):
    origin = toy_model_dir(tmp_path / "origin", "big", shards=12, shard_bytes=MIB)
    originals = {p.name: p.read_bytes() for p in origin.iterdir()}
    view = home / "buckets/models/big"  # models are pulled into bucket "models"
    server = ServeProcess(home, [toy_option("big", origin)], slow_read=0.1)
    servers.append(server)
    server.wait_live()
    # Kill once a few files are in and another is half-way in tmp/.
    wait_for(lambda: view.is_dir() and len(list(view.iterdir())) >= 3, 60, "files to land")
    wait_for(lambda: any((home / "tmp").rglob("*.part")), 30, "a partial file")
    workers = server.kill()
    assert workers, "the server had no workers"
    assert_gone(workers)

    landed = {p.name: p.read_bytes() for p in view.iterdir()}
    figures["files_landed_at_kill"] = f"{len(landed)}/{len(originals)}"
    assert 3 <= len(landed) < len(originals)
    assert all(data == originals[name] for name, data in landed.items())  # whole or absent
    status = cache_status(home, "big")
    assert status["status"] == "Failed" and "interrupted" in status["error"]

    # Restart: the deploy pulls again (resuming), the model loads and answers.
    restarted = time.monotonic()
    with ServeProcess(home, [toy_option("big", origin)]) as again:
        servers.append(again)
        r = infer(again, "big")
        figures["restart_to_first_answer_s"] = time.monotonic() - restarted
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [1.0, 2.0]
    assert {p.name: p.read_bytes() for p in view.iterdir()} == originals
    status = cache_status(home, "big")
    figures["resume"] = [e["message"] for e in status["events"] if e["kind"] == "available"][-1]
    assert status["status"] == "Available"
    assert status["progress"]["files_done"] == len(originals)
    assert_verify_ok(home)
    # A local source's partial copies stay in tmp/ (never in a view) until gc collects them.
    assert cli(home, "gc", "--tmp-age", "0").returncode == 0
    assert not list((home / "tmp").rglob("*.part"))
    assert_verify_ok(home)


@pytest.mark.slow
def test_sigkill_during_a_model_load_then_restart_loads_it(home: Path, tmp_path: Path, servers,
                                                          figures: dict):
    origin = toy_model_dir(tmp_path / "origin", "slowload", shards=2, shard_bytes=MIB)
    log = tmp_path / "log"
    option = toy_option("slowload", origin, load_delay=30, log=log)
    server = ServeProcess(home, [option])
    servers.append(server)
    server.wait_live()
    # A request starts the load; the worker sits in load() when the server dies.
    pending: list = []
    thread = threading.Thread(target=lambda: pending.append(_safe_infer(server, "slowload")))
    thread.start()
    wait_for(lambda: log.exists() and any(log.glob("load-*")), 60, "the load to start")
    loading_pid = int(next(log.glob("load-*")).name.split("-")[1])
    killed = time.monotonic()
    workers = server.kill()
    assert loading_pid in {w.pid for w in workers}
    assert_gone(workers)  # PR_SET_PDEATHSIG: no orphan keeps the half-loaded model
    figures["workers_gone_after_kill_s"] = time.monotonic() - killed
    thread.join(30)
    assert pending and pending[0] is None  # the client saw the connection drop

    # Nothing holds the cache open any more: it can be verified, and even removed.
    status = cache_status(home, "slowload")
    assert status["status"] == "Available" and not status["in_use"]
    assert_verify_ok(home)

    restarted = time.monotonic()
    with ServeProcess(home, [toy_option("slowload", origin, log=log)]) as again:
        servers.append(again)
        r = infer(again, "slowload")
        figures["restart_to_first_answer_s"] = time.monotonic() - restarted
        assert r.status_code == 200, r.text
        model = again.client.get("/api/v1/models/slowload").json()
        assert model["state"] == "Ready"
    assert_verify_ok(home)
    rm = cli(home, "cache", "rm", "slowload")
    assert rm.returncode == 0, rm.stderr  # not left "in use" by a dead process
    assert_verify_ok(home)


def _safe_infer(server: ServeProcess, model: str):
    import httpx

    try:
        return infer(server, model, timeout=60)
    except httpx.HTTPError:
        return None


@pytest.mark.slow
def test_a_restarted_server_repairs_what_a_crash_left_in_the_store(home: Path, tmp_path: Path,
                                                                    servers):
    """A crash in the middle of ``cache rm`` leaves a Deleting row and a half-removed
    view (rm marks first, then removes); a crash between linking a blob and writing
    its row leaves a blob file without a row. ``verify`` reports both until the
    store is repaired; starting the server repairs it."""
    kept = toy_model_dir(tmp_path / "origin", "kept", shards=1, shard_bytes=MIB)
    gone = toy_model_dir(tmp_path / "origin", "gone", shards=2, shard_bytes=MIB)
    for d in (kept, gone):
        assert cli(home, "pull", str(d), "--name", d.name, "-q").returncode == 0
    # The crash, reproduced: rm's first step done, half of the view removed.
    with sqlite3.connect(home / "meta.db") as conn:
        conn.execute("UPDATE caches SET status = 'Deleting' WHERE name = 'gone'")
    next((home / "buckets/default/gone").glob("shard-*")).unlink()
    # And a verified blob file whose row was never committed.
    orphan = os.urandom(4096)
    sha = hashlib.sha256(orphan).hexdigest()
    (home / "blobs/sha256" / sha[:2]).mkdir(parents=True, exist_ok=True)
    (home / "blobs/sha256" / sha[:2] / sha).write_bytes(orphan)
    before = cli(home, "cache", "verify")
    assert before.returncode == 1 and "orphan-blob" in before.stdout, before.stdout

    served = toy_model_dir(tmp_path / "origin", "served")
    with ServeProcess(home, [toy_option("served", served)]) as server:
        servers.append(server)
        assert infer(server, "served").status_code == 200
    assert_verify_ok(home)
    ls = cli(home, "cache", "ls", "--json")
    assert sorted(c["name"] for c in json.loads(ls.stdout)) == ["kept", "served"]
    assert not (home / "buckets/default/gone").exists()
