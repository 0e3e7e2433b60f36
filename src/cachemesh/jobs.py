"""Jobs: long-running work on a node (a model conversion) with a durable record.

A job is a row in the ``jobs`` table and its log is rows in ``job_logs``
(schema in store/db.py), so any process (the CLI, the server's control API)
can list jobs and follow one that another process runs. This module knows
nothing of HTTP or the command line: ``cachemesh jobs`` and ``/api/v1/jobs``
are thin adapters over :class:`Jobs`.

Lifecycle::

    Queued --run--> Running --+--> Succeeded   (result: a small JSON object)
                              +--> Failed      (error: one line; the log has the traceback)

A job is Running only while the process running it holds its lock
(``locks/job/<id>.lock``); the kernel drops the lock when the process dies, so
a job whose runner crashed reads as Failed ("interrupted") without anyone
having to clean up.

A log line is ``(id, ts, level, message)``; ``id`` increases, so a reader
follows a log by asking for the lines after the last id it saw. While a job
runs, warnings and log records of level WARNING and above that the running
thread emits through :mod:`logging` (a converter library complaining, say)
are copied into its log as well.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CachemeshError, InvalidInputError, JobNotFoundError
from .store.locks import FileLock, is_locked

if TYPE_CHECKING:
    from .store import Store

QUEUED, RUNNING, SUCCEEDED, FAILED = "Queued", "Running", "Succeeded", "Failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
LEVELS = ("debug", "info", "warning", "error")
# How often a running job writes its progress to the database.
PROGRESS_INTERVAL_S = 0.25
INTERRUPTED = "interrupted: the process running the job stopped before it finished"


@dataclass
class Job:
    id: str
    kind: str  # what the job does: "convert"
    key: str | None  # what it produces (a conversion identity); jobs with one key run one at a time
    status: str
    spec: dict[str, Any]  # the request, as given
    result: dict[str, Any] | None
    error: str | None
    progress: float  # 0..1
    step: str | None  # what it is doing now, in a few words
    pid: int | None
    host: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @property
    def done(self) -> bool:
        return self.status in (SUCCEEDED, FAILED)

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration": self.duration}


@dataclass
class LogLine:
    id: int
    ts: float
    level: str
    message: str


def new_job_id(kind: str) -> str:
    """``convert-20250102-153000-3fa2c1``: sorts by creation time, safe as a file name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{kind}-{stamp}-{secrets.token_hex(3)}"


class _ThreadLogHandler(logging.Handler):
    """Copies records emitted by one thread into a job's log."""

    def __init__(self, run: JobRun, thread_id: int) -> None:
        super().__init__(logging.WARNING)
        self.run, self.thread_id = run, thread_id

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id:
            return
        try:
            level = record.levelname.lower()
            self.run.log(record.getMessage(), level if level in LEVELS else "warning")
        except Exception:  # a log handler must never break the job
            pass


_capture_lock = threading.Lock()
_capture_count = 0


@contextmanager
def _capture_warnings() -> Iterator[None]:
    # logging.captureWarnings is process-wide: count the jobs that want it.
    global _capture_count
    with _capture_lock:
        _capture_count += 1
        if _capture_count == 1:
            logging.captureWarnings(True)
    try:
        yield
    finally:
        with _capture_lock:
            _capture_count -= 1
            if _capture_count == 0:
                logging.captureWarnings(False)


class JobRun:
    """The handle a running job reports through: log lines, progress, result."""

    def __init__(self, jobs: Jobs, job_id: str,
                 listener: Callable[[Job], None] | None = None) -> None:
        self.jobs, self.id, self.listener = jobs, job_id, listener
        self.result: dict[str, Any] | None = None
        self._progress = 0.0
        self._step: str | None = None
        self._last_write = 0.0
        self._lock = threading.Lock()

    def log(self, message: str, level: str = "info") -> None:
        if level not in LEVELS:
            raise InvalidInputError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
        self.jobs._append_log(self.id, level, message)

    def warning(self, message: str) -> None:
        self.log(message, "warning")

    def progress(self, fraction: float, step: str | None = None) -> None:
        """Report progress (0..1) and, optionally, the step now running (logged once)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        with self._lock:
            new_step = step is not None and step != self._step
            self._progress = fraction
            if step is not None:
                self._step = step
            due = new_step or now - self._last_write >= PROGRESS_INTERVAL_S
            if due:
                self._last_write = now
        if new_step:
            self.log(step)  # type: ignore[arg-type]
        if due:
            self.jobs._update(self.id, progress=fraction, step=self._step)
            if self.listener is not None:
                self.listener(self.jobs.get(self.id))

    def succeed(self, result: dict[str, Any]) -> None:
        self.result = result


class Jobs:
    """The jobs of one store. Safe to use from several threads and processes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.locks_dir = store.locks_dir / "job"

    # -- reading -------------------------------------------------------------------

    def _lock_path(self, job_id: str) -> Path:
        from .store.names import check_name

        return self.locks_dir / f"{check_name(job_id, 'job id')}.lock"

    def _job(self, row: Any) -> Job:
        data = dict(row)
        data["spec"] = json.loads(data["spec"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        job = Job(**data)
        if job.status == RUNNING and not is_locked(self._lock_path(job.id)):
            job.status, job.error = FAILED, job.error or INTERRUPTED
        return job

    def get(self, job_id: str) -> Job:
        rows = self.db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFoundError(job_id)
        return self._job(rows[0])

    def list(self, *, kind: str | None = None, status: str | None = None,
             key: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first. ``status`` filters on the status as read (interrupted = Failed)."""
        if status is not None and status not in STATUSES:
            raise InvalidInputError(f"unknown job status {status!r} (one of {', '.join(STATUSES)})")
        where, params = [], []
        for column, value in (("kind", kind), ("key", key)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.db.query(sql + " ORDER BY created_at DESC, id DESC", tuple(params))
        jobs = [self._job(r) for r in rows]
        if status is not None:
            jobs = [j for j in jobs if j.status == status]
        return jobs[:limit] if limit is not None else jobs

    def running(self, kind: str, key: str) -> Job | None:
        """The job of this kind and key that is running now, if any."""
        for job in self.list(kind=kind, key=key):
            if job.status == RUNNING:
                return job
        return None

    def logs(self, job_id: str, *, after: int = 0, limit: int = 10_000) -> list[LogLine]:
        self.get(job_id)
        rows = self.db.query(
            "SELECT id, ts, level, message FROM job_logs WHERE job = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (job_id, after, limit),
        )
        return [LogLine(**dict(r)) for r in rows]

    # -- writing -------------------------------------------------------------------

    def create(self, kind: str, spec: dict[str, Any], *, key: str | None = None) -> Job:
        from .sources.redact import redact_source

        # A job's spec is shown (jobs ls, the API), never read back: a source in it is
        # kept as shown, a presigned URL's signature hidden.
        spec = {k: redact_source(v) if k.endswith("source") and isinstance(v, str) else v
                for k, v in spec.items()}
        now = time.time()
        job_id = new_job_id(kind)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, kind, key, status, spec, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, key, QUEUED, json.dumps(spec, sort_keys=True), now, now),
            )
        return self.get(job_id)

    def _update(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        for name in ("result", "spec"):
            if name in fields and fields[name] is not None:
                fields[name] = json.dumps(fields[name], sort_keys=True)
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def _append_log(self, job_id: str, level: str, message: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO job_logs (job, ts, level, message) VALUES (?, ?, ?, ?)",
                (job_id, time.time(), level, message),
            )

    @contextmanager
    def run(self, job_id: str, *,
            listener: Callable[[Job], None] | None = None) -> Iterator[JobRun]:
        """Run a Queued job in this thread: ``with jobs.run(id) as run: ...``.

        The body reports through the :class:`JobRun`. Leaving the block normally
        marks the job Succeeded with ``run.result``; an exception marks it Failed,
        logs the traceback, and propagates.
        """
        job = self.get(job_id)
        if job.status != QUEUED:
            raise InvalidInputError(f"job {job_id} is {job.status}; only a Queued job can run")
        lock = FileLock(self._lock_path(job_id))
        lock.acquire()
        handle = JobRun(self, job_id, listener)
        handler = _ThreadLogHandler(handle, threading.get_ident())
        root = logging.getLogger()
        try:
            self._update(job_id, status=RUNNING, started_at=time.time(), pid=os.getpid(),
                         host=socket.gethostname())
            handle.log(f"job {job_id} started (pid {os.getpid()})")
            root.addHandler(handler)
            try:
                with _capture_warnings():
                    yield handle
            finally:
                root.removeHandler(handler)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                message = "interrupted by the user"
            elif isinstance(exc, CachemeshError):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}"
            detail = "".join(traceback.format_exception(exc)).rstrip()
            try:
                handle.log(detail, "error")
                self._update(job_id, status=FAILED, error=message, finished_at=time.time(),
                             step=handle._step)
            finally:
                self._release(lock)
            if listener is not None:
                listener(self.get(job_id))
            raise
        else:
            try:
                self._update(job_id, status=SUCCEEDED, result=handle.result or {}, progress=1.0,
                             step="finished",
                             finished_at=time.time(), error=None)
                handle.log(f"job {job_id} succeeded")
            finally:
                self._release(lock)
            if listener is not None:
                listener(self.get(job_id))

    def _release(self, lock: FileLock) -> None:
        # The job is finished in the database before its lock goes, so a reader
        # never sees a Running row without a lock (which would read as interrupted).
        lock.release()
        lock.path.unlink(missing_ok=True)

    def remove(self, job_id: str) -> None:
        """Forget a finished job and its log."""
        job = self.get(job_id)
        if job.status == RUNNING:
            from .errors import InUseError

            raise InUseError(f"job {job_id} is running")
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM job_logs WHERE job = ?", (job_id,))
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._lock_path(job_id).unlink(missing_ok=True)
