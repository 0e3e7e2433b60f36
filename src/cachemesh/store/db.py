"""The node-local metadata database: ``$CACHEMESH_HOME/meta.db``.

SQLite in WAL mode: embedded, transactional and safe across processes (the CLI,
the server and its workers open it at once). ``PRAGMA user_version`` holds the
schema version; :data:`MIGRATIONS` brings an older store up to date when a newer
cachemesh opens it, inside one transaction. A store written by a newer
cachemesh is refused rather than guessed at.

Schema (version 1)::

    caches   one row per DataCache: its spec, status, progress, pin, last access
      name TEXT PRIMARY KEY, bucket, path, source, spec (JSON), status,
      pinned, error, revision, bytes_total, bytes_done, files_total,
      files_done, rate, created_at, updated_at, last_access
      UNIQUE(bucket, path)
    files    the files of a cache, each pointing at one blob
      cache -> caches.name ON DELETE CASCADE, path, sha256 -> blobs.sha256,
      size, origin_tag (what identified the bytes at the origin: etag, oid,
      mtime), added_at; PRIMARY KEY(cache, path)
    blobs    one row per blob file under blobs/ (see store/blobs.py)
      sha256 TEXT PRIMARY KEY, size, created_at
    events   timestamped lifecycle events of a cache (progress, warnings, errors)
      id, cache, ts, level, kind, message

Version 2 adds jobs (long-running work such as conversions; see jobs.py)::

    jobs      one row per job: id, kind, key (what the job produces, e.g. a
              conversion identity), status, spec (JSON), result (JSON), error,
              progress (0..1), step, pid, host, created_at, started_at,
              finished_at, updated_at
    job_logs  the log of a job, in order: id, job -> jobs.id ON DELETE CASCADE,
              ts, level, message

Version 3 adds::

    models   models deployed on the server at run time (POST /api/v1/models,
             ``cachemesh models deploy``), so they survive a restart
      name TEXT PRIMARY KEY, spec (JSON: source, runtime, version,
      parameters, eager), created_at, updated_at

      ``spec`` now holds the model's whole document (versions, traffic,
      routes, aliases, eager, scaling: serve/core/documents.py, PUT
      /api/v1/models/{name}); a row from before documents holds the simple
      spec above and is read as a one-version document. Same column, same
      table: no migration.

Version 4 adds::

    buckets  protected buckets (store/buckets.py); a bucket without a row is open
      name TEXT PRIMARY KEY, salt (hex), digest (hex sha256 of salt + token:
      the token itself is never stored), created_at, updated_at

Version 5 adds::

    hub_trees  the complete file list of a Hugging Face commit, as the Hub listed it
               at pull time (store/hub_layout.py writes it to hub/<folder>/trees/):
               kept here so that the tree can be written again when the repo folder
               comes back (a bucket unprotected, gc repairing it) without the origin
      folder TEXT, commit TEXT, tree (JSON: path -> size, blob_id, lfs_sha256,
      lfs_size), PRIMARY KEY (folder, commit)

Rows are written after the files they describe (see store/blobs.py), so after
a crash the database never points at a file that does not exist; the reverse
(a blob file without a row) is harmless and collected by ``gc``.

Rejected: one JSON file per cache. It cannot be updated atomically together
with the blob references of other caches, and listing needs a scan.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CachemeshError, CapacityError, StoreError, StoreVersionError


def _script(conn: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT the migration's transaction; run statements one by one.
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v1(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE caches (
            name        TEXT PRIMARY KEY,
            bucket      TEXT NOT NULL,
            path        TEXT NOT NULL,
            source      TEXT NOT NULL,
            spec        TEXT NOT NULL,
            status      TEXT NOT NULL,
            pinned      INTEGER NOT NULL DEFAULT 0,
            error       TEXT,
            revision    TEXT,
            bytes_total INTEGER NOT NULL DEFAULT 0,
            bytes_done  INTEGER NOT NULL DEFAULT 0,
            files_total INTEGER NOT NULL DEFAULT 0,
            files_done  INTEGER NOT NULL DEFAULT 0,
            rate        REAL NOT NULL DEFAULT 0,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            last_access REAL NOT NULL,
            UNIQUE (bucket, path)
        );
        CREATE TABLE blobs (
            sha256     TEXT PRIMARY KEY,
            size       INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE files (
            cache      TEXT NOT NULL REFERENCES caches(name) ON DELETE CASCADE,
            path       TEXT NOT NULL,
            sha256     TEXT NOT NULL REFERENCES blobs(sha256),
            size       INTEGER NOT NULL,
            origin_tag TEXT,
            added_at   REAL NOT NULL,
            PRIMARY KEY (cache, path)
        );
        CREATE INDEX files_by_blob ON files(sha256);
        CREATE TABLE events (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            cache   TEXT NOT NULL,
            ts      REAL NOT NULL,
            level   TEXT NOT NULL,
            kind    TEXT NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX events_by_cache ON events(cache, id);
        """
    )


def _jobs(conn: sqlite3.Connection) -> None:
    # Self-contained (IF NOT EXISTS): it does not depend on its position in MIGRATIONS.
    _script(
        conn,
        """
        CREATE TABLE IF NOT EXISTS jobs (
            id          TEXT PRIMARY KEY,
            kind        TEXT NOT NULL,
            key         TEXT,
            status      TEXT NOT NULL,
            spec        TEXT NOT NULL,
            result      TEXT,
            error       TEXT,
            progress    REAL NOT NULL DEFAULT 0,
            step        TEXT,
            pid         INTEGER,
            host        TEXT,
            created_at  REAL NOT NULL,
            started_at  REAL,
            finished_at REAL,
            updated_at  REAL NOT NULL
        );
        CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs(kind, key);
        CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs(created_at);
        CREATE TABLE IF NOT EXISTS job_logs (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            job     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            ts      REAL NOT NULL,
            level   TEXT NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS job_logs_by_job ON job_logs(job, id);
        """
    )


def _models(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE models (
            name       TEXT PRIMARY KEY,
            spec       TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        """
    )


def _buckets(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE IF NOT EXISTS buckets (
            name       TEXT PRIMARY KEY,
            salt       TEXT NOT NULL,
            digest     TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        """
    )


def _hub_trees(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE IF NOT EXISTS hub_trees (
            folder TEXT NOT NULL,
            "commit" TEXT NOT NULL,
            tree   TEXT NOT NULL,
            PRIMARY KEY (folder, "commit")
        );
        """
    )


# MIGRATIONS[i] takes a database at version i to version i + 1. Append only:
# never edit a migration that has shipped.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1, _jobs, _models, _buckets, _hub_trees]
SCHEMA_VERSION = len(MIGRATIONS)

# How long a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 30.0


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 64 * 1024
    except OSError:
        return False


class Database:
    """One SQLite file shared by threads (a connection each) and processes."""

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._migrate()

    def _open(self) -> sqlite3.Connection:
        # Switching a new file to WAL takes an exclusive lock, and SQLite answers
        # SQLITE_BUSY at once (without its busy handler) while another process is
        # creating or recovering the same file: retry until busy_timeout.
        started = time.monotonic()
        while True:
            conn = None
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None,
                    check_same_thread=False,
                )
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                return conn
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                busy = "locked" in str(exc) or "busy" in str(exc)
                if busy and time.monotonic() - started < self.busy_timeout:
                    time.sleep(0.02)
                    continue
                if isinstance(exc, sqlite3.OperationalError) and _disk_full(self.path.parent):
                    raise self._translate(exc, full=True) from exc  # shows as "disk I/O error"
                raise StoreError(f"cannot open the metadata database {self.path}: {exc}") from exc

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"the store at {self.path.parent} has schema version {version}, "
                    f"newer than this cachemesh understands ({SCHEMA_VERSION}); upgrade cachemesh"
                )
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](conn)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): commits on success, rolls back on error."""
        conn = self.conn
        started = time.monotonic()
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                # The busy handler already waited busy_timeout; say who is blocking.
                if "locked" in str(exc) and time.monotonic() - started < self.busy_timeout:
                    continue
                raise self._translate(exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:  # SQLite has rolled back already after SQLITE_FULL
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise self._translate(exc) from exc
            raise

    def _translate(self, exc: sqlite3.OperationalError, *, full: bool = False) -> CachemeshError:
        """sqlite3's errors as ours (2026-11: a full disk escaped as a raw
        ``sqlite3.OperationalError`` from a pull's progress update)."""
        text = str(exc)
        code = getattr(exc, "sqlite_errorcode", None)
        if full or code == sqlite3.SQLITE_FULL or "is full" in text:
            return CapacityError(f"the disk under {self.path.parent} is full: cannot write"
                                 f" the metadata database {self.path.name}")
        if "locked" in text or "busy" in text:
            return StoreError(
                f"the metadata database {self.path} is locked by another process: {exc}")
        return StoreError(f"metadata database {self.path}: {exc}")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
