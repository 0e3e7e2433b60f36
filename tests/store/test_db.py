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


def _open_and_write(path: str, i: int, start_at: float) -> int:
    import time

    time.sleep(max(0.0, start_at - time.time()))  # all processes open at the same moment
    db = Database(Path(path))
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO blobs (sha256, size, created_at) VALUES (?, ?, 0)", (f"{i:064x}", i)
        )
    return i


def test_processes_creating_one_database_at_once_all_succeed(tmp_path: Path) -> None:
    # Several processes opening a store that does not exist yet race to create the
    # file and switch it to WAL; none may fail with "database is locked".
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        for round_ in range(5):
            path = str(tmp_path / f"meta{round_}.db")
            start_at = time.time() + 0.3
            done = pool.starmap(_open_and_write, [(path, i, start_at) for i in range(8)])
            assert sorted(done) == list(range(8))
            assert Database(Path(path)).query("SELECT count(*) FROM blobs")[0][0] == 8
