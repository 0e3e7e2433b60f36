import sqlite3
from pathlib import Path

import pytest

from cachemesh.errors import StoreVersionError
from cachemesh.store import db as dbmod
from cachemesh.store.db import SCHEMA_VERSION, Database


def test_new_database_is_wal_and_current(tmp_path: Path) -> None:
    db = Database(tmp_path / "meta.db")
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    tables = {r[0] for r in db.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"caches", "files", "blobs", "events"} <= tables


def test_every_older_version_is_migrated_in_place(tmp_path: Path) -> None:
    # Build a store at each historical version with the migrations that existed
    # then, put a row in it, and open it with the current code.
    for version in range(1, SCHEMA_VERSION + 1):
        path = tmp_path / f"v{version}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        for step in dbmod.MIGRATIONS[:version]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute(
            "INSERT INTO blobs (sha256, size, created_at) VALUES (?, 1, 0)", ("a" * 64,)
        )
        conn.execute("COMMIT")
        conn.close()
        db = Database(path)
        assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        assert db.query("SELECT size FROM blobs")[0][0] == 1


def test_store_from_a_newer_cachemesh_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreVersionError, match="newer"):
        Database(path)


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    db = Database(tmp_path / "meta.db")
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO blobs (sha256, size, created_at) VALUES ('x', 1, 0)")
            raise RuntimeError("boom")
    assert db.query("SELECT COUNT(*) FROM blobs")[0][0] == 0
