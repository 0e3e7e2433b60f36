import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from cachemesh.errors import IntegrityError
from cachemesh.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def test_write_stream_hashes_while_writing_and_makes_blob_read_only(store: Store) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    seen = []
    ref = store.blobs.write_stream(io.BytesIO(data), expected_size=len(data), on_bytes=seen.append)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    path = store.blobs.path(ref.sha256)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert sum(seen) == len(data)
    assert not list(store.blobs.tmp_dir.glob("*.part"))
    assert store.db.query("SELECT size FROM blobs WHERE sha256 = ?", (ref.sha256,))[0][0] == len(data)


def test_same_content_is_stored_once_and_keeps_its_inode(store: Store) -> None:
    data = b"same bytes" * 1000
    a = store.blobs.write_stream(io.BytesIO(data))
    inode = store.blobs.path(a.sha256).stat().st_ino
    b = store.blobs.write_stream(io.BytesIO(data))
    assert a == b
    assert store.blobs.path(b.sha256).stat().st_ino == inode
    assert len(store.blobs.files_on_disk()) == 1


@pytest.mark.parametrize("kwargs", [{"expected_size": 5}, {"expected_sha256": "0" * 64}])
def test_bytes_that_break_their_promise_never_become_visible(store: Store, kwargs: dict) -> None:
    with pytest.raises(IntegrityError):
        store.blobs.write_stream(io.BytesIO(b"twelve bytes"), **kwargs)
    assert store.blobs.files_on_disk() == {}
    assert not list(store.blobs.tmp_dir.glob("*.part"))
    assert store.db.query("SELECT COUNT(*) FROM blobs")[0][0] == 0


def test_verify_catches_a_corrupted_blob(store: Store) -> None:
    ref = store.blobs.write_stream(io.BytesIO(b"x" * 4096))
    path = store.blobs.path(ref.sha256)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"y")
    kinds = {p.kind for p in store.verify()}
    assert kinds == {"corrupt-blob"}


def test_blob_file_without_row_is_reported_and_collected(store: Store) -> None:
    ref = store.blobs.write_stream(io.BytesIO(b"orphan"))
    with store.db.transaction() as conn:
        conn.execute("DELETE FROM blobs")
    assert [p.kind for p in store.verify()] == ["orphan-blob"]
    assert store.collect_blobs() == (1, 6)
    assert not store.blobs.has(ref.sha256)
    assert store.verify() == []


def test_full_disk_while_writing_leaves_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from cachemesh.errors import CapacityError

    class Full(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf):  # noqa: ANN001
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CapacityError, match="full"):
        store.blobs.write_stream(io.BufferedReader(Full()))
    assert not list(store.blobs.tmp_dir.glob("*.part"))


def test_recover_adopts_a_verified_orphan_and_drops_a_bad_one(store: Store) -> None:
    good = store.blobs.write_stream(io.BytesIO(b"kept bytes"))
    with store.db.transaction() as conn:
        conn.execute("DELETE FROM blobs")  # as if killed between link and row
    bogus = store.blobs.root / "ab" / ("ab" + "0" * 62)
    bogus.parent.mkdir(parents=True, exist_ok=True)
    bogus.write_bytes(b"not what the name says")
    assert store.recover() == (1, 1)
    assert not bogus.exists()
    assert store.blobs.has(good.sha256)
    assert store.verify() == []
