"""Jobs: durable records, progress, logs, failures, interrupted runners, the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from cachemesh.caches import Caches
from cachemesh.errors import InvalidInputError, JobNotFoundError
from cachemesh.jobs import FAILED, INTERRUPTED, QUEUED, RUNNING, SUCCEEDED, Jobs
from cachemesh.store.db import Database


@pytest.fixture
def jobs(caches: Caches) -> Jobs:
    return Jobs(caches.store)


def test_a_job_runs_reports_progress_and_keeps_its_log(jobs: Jobs):
    job = jobs.create("convert", {"source": "x"}, key="k1")
    assert job.status == QUEUED and job.spec == {"source": "x"}
    seen = []
    with jobs.run(job.id, listener=seen.append) as run:
        assert jobs.get(job.id).status == RUNNING
        assert jobs.get(job.id).pid == os.getpid()
        assert jobs.running("convert", "k1").id == job.id
        run.progress(0.5, "half-way")
        run.log("a detail")
        run.succeed({"view": "/somewhere"})
    done = jobs.get(job.id)
    assert done.status == SUCCEEDED and done.result == {"view": "/somewhere"}
    assert done.progress == 1.0 and done.finished_at >= done.started_at
    assert jobs.running("convert", "k1") is None
    messages = [line.message for line in jobs.logs(job.id)]
    assert messages[1:4] == ["half-way", "a detail", f"job {job.id} succeeded"]
    assert [j.status for j in seen][-1] == SUCCEEDED and any(j.step == "half-way" for j in seen)
    # Follow a log by the last id seen.
    lines = jobs.logs(job.id)
    assert [x.message for x in jobs.logs(job.id, after=lines[1].id)] == messages[2:]
    # Records survive the process: a fresh connection reads the same thing.
    again = Jobs(Caches().store)
    assert again.get(job.id).to_dict()["result"] == {"view": "/somewhere"}


def test_a_failing_job_is_failed_with_the_error_and_the_traceback(jobs: Jobs):
    job = jobs.create("convert", {})
    with pytest.raises(ZeroDivisionError):
        with jobs.run(job.id) as run:
            run.progress(0.3, "dividing")
            1 / 0  # noqa: B018
    failed = jobs.get(job.id)
    assert failed.status == FAILED and failed.error == "ZeroDivisionError: division by zero"
    assert failed.step == "dividing" and failed.progress == pytest.approx(0.3)
    errors = [x for x in jobs.logs(job.id) if x.level == "error"]
    assert "Traceback" in errors[0].message and "1 / 0" in errors[0].message
    assert [j.id for j in jobs.list(status=FAILED)] == [job.id]
    assert jobs.list(status=SUCCEEDED) == []
    with pytest.raises(InvalidInputError, match="only a Queued job"):
        with jobs.run(job.id):
            pass


def test_warnings_and_library_log_records_land_in_the_job_log(jobs: Jobs):
    job = jobs.create("convert", {})
    with jobs.run(job.id):
        logging.getLogger("some.library").warning("weights look odd: %s", "norm")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
    lines = [(x.level, x.message) for x in jobs.logs(job.id)]
    assert ("warning", "weights look odd: norm") in lines
    assert any(level == "warning" and "deprecated thing" in m for level, m in lines)


def test_a_running_job_whose_process_died_reads_as_interrupted(jobs: Jobs, caches: Caches):
    job = jobs.create("convert", {})
    # What a killed runner leaves: a Running row and no lock holder.
    jobs._update(job.id, status=RUNNING, started_at=1.0)
    read = jobs.get(job.id)
    assert read.status == FAILED and read.error == INTERRUPTED
    assert jobs.running("convert", "any") is None


def test_a_killed_runner_process_leaves_an_interrupted_job(caches: Caches, clean_env):
    code = (
        "import os, signal\n"
        "from cachemesh.caches import Caches\n"
        "from cachemesh.jobs import Jobs\n"
        "jobs = Jobs(Caches().store)\n"
        "job = jobs.create('convert', {})\n"
        "with jobs.run(job.id) as run:\n"
        "    run.progress(0.4, 'working')\n"
        "    print(job.id, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=60)
    assert proc.returncode == -9
    job = Jobs(caches.store).get(proc.stdout.strip())
    assert job.status == FAILED and job.error == INTERRUPTED and job.step == "working"


def test_unknown_jobs_and_statuses(jobs: Jobs):
    with pytest.raises(JobNotFoundError):
        jobs.get("convert-nope")
    with pytest.raises(InvalidInputError):
        jobs.list(status="Sleeping")
    job = jobs.create("convert", {})
    jobs.remove(job.id)
    with pytest.raises(JobNotFoundError):
        jobs.logs(job.id)


def test_the_jobs_table_is_added_to_an_existing_store(tmp_path):
    import sqlite3

    from cachemesh.store import db as dbmod

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    dbmod.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    conn.close()
    db = Database(path)
    tables = {r[0] for r in db.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "job_logs", "caches"} <= tables


def cm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachemesh", *args], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=60)


def test_cli_lists_jobs_and_prints_logs(jobs: Jobs):
    ok = jobs.create("convert", {"source": "/models/a"})
    with jobs.run(ok.id) as run:
        run.log("line one")
        run.succeed({"view": "/v"})
    bad = jobs.create("convert", {"source": "/models/b"})
    with pytest.raises(RuntimeError):
        with jobs.run(bad.id):
            raise RuntimeError("boom")

    listed = json.loads(cm("jobs", "ls", "--json").stdout)
    assert [(j["id"], j["status"]) for j in listed] == [(bad.id, FAILED), (ok.id, SUCCEEDED)]
    assert listed[0]["error"] == "RuntimeError: boom" and listed[1]["result"] == {"view": "/v"}
    failed_only = json.loads(cm("jobs", "ls", "--json", "--status", "Failed").stdout)
    assert [j["id"] for j in failed_only] == [bad.id]
    table = cm("jobs", "ls").stdout
    assert ok.id in table and "Succeeded" in table and "boom" in table

    text = cm("jobs", "logs", ok.id)
    assert text.returncode == 0 and "line one" in text.stdout
    failed = cm("jobs", "logs", bad.id)
    assert "Traceback" in failed.stdout and "failed: RuntimeError: boom" in failed.stderr
    as_json = json.loads(cm("jobs", "logs", bad.id, "--json").stdout)
    assert as_json["job"]["status"] == FAILED and as_json["logs"][-1]["level"] == "error"
    missing = cm("jobs", "logs", "convert-missing")
    assert missing.returncode == 3 and "no job with id" in missing.stderr
