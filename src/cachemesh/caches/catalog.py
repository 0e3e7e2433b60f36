"""CacheCatalog: the rows of the caches in ``meta.db``. Every SQL statement of this
package is here; the rest of ``caches/`` reads and writes through it.

What the catalog writes (the whole schema and its migrations: ``store/db.py``)::

    caches     one row per cache, written by declare() (status Pending), then by
               update() as a pull goes (status, error, revision, progress every
               0.5 s), touch() (last_access) and delete(); the columns:
      name TEXT PRIMARY KEY, bucket, path, source (URI, credentials redacted),
      spec (the CacheSpec as JSON, its source canonical), status (spec.py),
      pinned, error, revision (the commit or version pulled), bytes_total,
      bytes_done, files_total, files_done, rate, created_at, updated_at,
      last_access; UNIQUE(bucket, path)
    events     what happened to a cache, in order (id): ts, level (info, warning,
               error), kind (created, pull-started, available, failed, evicted,
               pinned, unpinned, warning, verification, corrupt-blob), message;
               deleted with the cache
    hub_trees  a Hugging Face commit's whole file list as the Hub listed it
      folder (hub/<folder>), commit, tree (JSON: path -> TreeEntry): written at the
      end of a pull, dropped when no cache holds the commit any more

It reads ``files`` and ``blobs``, which the store writes (``store/__init__.py``:
file rows after their blob, so a row never points at a missing file).

Rejected: SQL next to each use (as it was: 26 statements across the pull, eviction
and the hub view), where no one place said which rows the lifecycle reads and writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from ..errors import ConflictError
from ..store.db import Database
from ..store.names import is_within
from .spec import AVAILABLE, FAILED, PENDING


def _dicts(rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


class CacheCatalog:
    """The caches, their events and the kept hub trees, over one :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- caches --------------------------------------------------------------------

    def row(self, name: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM caches WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None

    def exists(self, name: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM caches WHERE name = ?", (name,)))

    def rows(self, bucket: str | None = None) -> list[dict[str, Any]]:
        """Every row (of ``bucket``), by name."""
        if bucket is None:
            return _dicts(self.db.query("SELECT * FROM caches ORDER BY name"))
        return _dicts(self.db.query("SELECT * FROM caches WHERE bucket = ? ORDER BY name",
                                    (bucket,)))

    def scan(self) -> list[dict[str, Any]]:
        """Every row, in the table's own order (what the hub view walks)."""
        return _dicts(self.db.query("SELECT * FROM caches"))

    def names(self, status: str) -> list[str]:
        return [r["name"] for r in self.db.query(
            "SELECT name FROM caches WHERE status = ?", (status,))]

    def statuses(self) -> dict[str, str]:
        return {r["name"]: r["status"] for r in self.db.query("SELECT name, status FROM caches")}

    def bucket_counts(self) -> dict[str, int]:
        return {r["bucket"]: r["n"] for r in self.db.query(
            "SELECT bucket, COUNT(*) AS n FROM caches GROUP BY bucket")}

    def declare(self, name: str, bucket: str, path: str, source: str, spec: dict[str, Any],
                message: str) -> dict[str, Any] | None:
        """Insert cache ``name`` as Pending with its "created" event, unless a row of that
        name exists: then that row is returned, and nothing is written. A path that
        overlaps another cache's in the bucket is refused in the same transaction, so
        two declarations at once cannot both take it."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM caches WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return dict(row)
            for other in conn.execute(
                "SELECT name, path FROM caches WHERE bucket = ?", (bucket,)
            ).fetchall():
                if is_within(path, other["path"]) or is_within(other["path"], path):
                    raise ConflictError(
                        f"path {path!r} in bucket {bucket!r} overlaps cache"
                        f" {other['name']!r} at {other['path']!r}"
                    )
            conn.execute(
                "INSERT INTO caches (name, bucket, path, source, spec, status, created_at,"
                " updated_at, last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, bucket, path, source, json.dumps(spec), PENDING, now, now, now),
            )
            conn.execute(
                "INSERT INTO events (cache, ts, level, kind, message) VALUES (?, ?, ?, ?, ?)",
                (name, now, "info", "created", message),
            )
        return None

    def update(self, name: str, **fields: Any) -> None:
        """Set columns of the row (``updated_at`` too)."""
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE caches SET {cols} WHERE name = ?", (*fields.values(), name))

    def touch(self, name: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE caches SET last_access = ? WHERE name = ?", (time.time(), name))

    def delete(self, name: str) -> None:
        """The row, its events and (by the foreign key) its file rows."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM caches WHERE name = ?", (name,))
            conn.execute("DELETE FROM events WHERE cache = ?", (name,))

    # -- events --------------------------------------------------------------------

    def add_event(self, name: str, kind: str, message: str, level: str = "info") -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO events (cache, ts, level, kind, message) VALUES (?, ?, ?, ?, ?)",
                (name, time.time(), level, kind, message),
            )

    def add_event_to_holders(self, sha256: str, kind: str, message: str,
                             level: str = "error") -> list[str]:
        """One event on every cache with a file of blob ``sha256``; returns those caches."""
        now = time.time()
        with self.db.transaction() as conn:
            names = [r["cache"] for r in conn.execute(
                "SELECT DISTINCT cache FROM files WHERE sha256 = ?", (sha256,))]
            for cache in names:
                conn.execute(
                    "INSERT INTO events (cache, ts, level, kind, message) VALUES (?, ?, ?, ?, ?)",
                    (cache, now, level, kind, message))
        return names

    def events(self, name: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        return _dicts(self.db.query(
            "SELECT id, ts, level, kind, message FROM events WHERE cache = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (name, after, limit),
        ))

    def last_event_ts(self, name: str, kind: str) -> float | None:
        return self.db.query("SELECT MAX(ts) AS ts FROM events WHERE cache = ? AND kind = ?",
                             (name, kind))[0]["ts"]

    # -- files and blobs (written by the store) -------------------------------------

    def integrity(self, name: str) -> dict[str, tuple[str, int, float]]:
        """Path in the view -> the blob's sha256, size and commit time."""
        rows = self.db.query(
            "SELECT f.path, f.sha256, b.size, b.created_at FROM files f"
            " JOIN blobs b ON b.sha256 = f.sha256 WHERE f.cache = ?", (name,))
        return {r["path"]: (r["sha256"], r["size"], r["created_at"]) for r in rows}

    def blob_owners(self) -> dict[str, set[str]]:
        """Every referenced blob -> the caches with a file of it."""
        refs: dict[str, set[str]] = {}
        for r in self.db.query("SELECT cache, sha256 FROM files"):
            refs.setdefault(r["sha256"], set()).add(r["cache"])
        return refs

    def blob_buckets(self, sha256: str) -> list[str]:
        """The buckets of the caches with a file of blob ``sha256``."""
        return [r["bucket"] for r in self.db.query(
            "SELECT DISTINCT c.bucket FROM files f JOIN caches c ON c.name = f.cache"
            " WHERE f.sha256 = ?", (sha256,))]

    def pulling_buckets(self) -> list[str]:
        """The buckets of the caches that are neither Available nor Failed."""
        return [r["bucket"] for r in self.db.query(
            "SELECT DISTINCT bucket FROM caches WHERE status NOT IN (?, ?)",
            (AVAILABLE, FAILED))]

    def blob_sizes(self) -> dict[str, int]:
        return {r["sha256"]: r["size"] for r in self.db.query("SELECT sha256, size FROM blobs")}

    def blobs_tagged(self, origin_tag: str, size: int) -> list[str]:
        """Blobs of files that the origin tagged ``origin_tag`` (a git blob id, an ETag)."""
        return [r["sha256"] for r in self.db.query(
            "SELECT DISTINCT sha256 FROM files WHERE origin_tag = ? AND size = ?",
            (origin_tag, size))]

    # -- hub_trees -------------------------------------------------------------------

    def keep_trees(self, folder: str, trees: dict[str, str], held: set[str]) -> None:
        """Record ``trees`` (commit -> JSON) of hub/``folder``; forget its other trees
        whose commit is not in ``held``."""
        with self.db.transaction() as conn:
            for commit, doc in trees.items():
                conn.execute('INSERT OR REPLACE INTO hub_trees (folder, "commit", tree)'
                             " VALUES (?, ?, ?)", (folder, commit, doc))
            for row in conn.execute('SELECT "commit" FROM hub_trees WHERE folder = ?',
                                    (folder,)).fetchall():
                if row[0] not in held and row[0] not in trees:
                    conn.execute('DELETE FROM hub_trees WHERE folder = ? AND "commit" = ?',
                                 (folder, row[0]))

    def trees(self, folder: str) -> dict[str, str]:
        """The kept trees of hub/``folder``: commit -> JSON."""
        return {r["commit"]: r["tree"] for r in self.db.query(
            'SELECT "commit", tree FROM hub_trees WHERE folder = ?', (folder,))}
