"""Content-addressed, immutable blobs.

On disk, under ``$CACHEMESH_HOME``::

    blobs/sha256/ab/abcdef0123…   one file per distinct content, named by the
                                  sha256 of its bytes, mode 0444; views and the
                                  Hugging Face layout are hardlinks to these
    tmp/                          partial writes; never linked from a view

The order of a write, so that a crash cannot lie:

1. bytes go to a file under ``tmp/`` while their sha256 is computed;
2. the size and the digest are checked against what was promised;
3. the file is fsynced and made read-only;
4. it is hardlinked to its content address (``link`` fails if another writer
   got there first, which is fine: same bytes) and the temporary name goes;
5. only then is the row committed to the ``blobs`` table.

A crash before 4 leaves a file in ``tmp/`` (resumable or collected); between 4
and 5, a blob file without a row, which a later commit of the same content
adopts and ``gc`` otherwise removes. The database never names a blob file
that does not exist.

Rejected: renaming over the final name. ``rename`` replaces an existing blob's
inode, and every view hardlinked to the old inode would silently stop sharing
storage with it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import CapacityError, IntegrityError, StoreError
from .db import Database
from .locks import private_dirs

_HEX = set("0123456789abcdef")
COPY_CHUNK = 8 * 1024 * 1024


def check_sha256(value: str) -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise IntegrityError(f"not a sha256 hex digest: {value!r}")
    return value


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class BlobStore:
    def __init__(
        self,
        home: Path,
        db: Database,
        shared_lock: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.root = home / "blobs" / "sha256"
        self.tmp_dir = home / "tmp"
        self.db = db
        # Held from the link to the row, so that gc (which takes it exclusively)
        # never sees a just-linked blob without its row and deletes it.
        self._shared_lock = shared_lock
        private_dirs(self.root)  # blobs/ and tmp/ are 0700 (store/buckets.py)
        private_dirs(self.tmp_dir)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        """Whether the blob's file is present (with the given size, if given)."""
        try:
            st = self.path(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def new_tmp(self, hint: str = "blob") -> Path:
        """A fresh, unique temporary path under ``tmp/`` (the caller creates it)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in hint)[:64]
        return self.tmp_dir / f"{safe}.{uuid.uuid4().hex}.part"

    def commit(self, tmp: Path, sha256: str, size: int) -> BlobRef:
        """Move a fully written, already hashed temporary file into place.

        The caller computed ``sha256`` while writing; this checks the size, makes
        the bytes durable and read-only, links them to their address and
        records the row. The temporary file is gone afterwards, in every case.
        """
        check_sha256(sha256)
        final = self.path(sha256)
        try:
            actual = tmp.stat().st_size
            if actual != size:
                raise IntegrityError(f"blob {sha256[:12]}: expected {size} bytes, wrote {actual}")
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o444)
            private_dirs(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if disk_full(exc):
                raise CapacityError(f"the disk under {self.root} is full") from exc
            raise StoreError(f"cannot store blob {sha256[:12]}: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._shared_lock():
            try:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    if final.stat().st_size != size:
                        # A damaged blob from before; the verified bytes replace it.
                        os.replace(tmp, final)
                fsync_dir(final.parent)
            except OSError as exc:
                if disk_full(exc):
                    raise CapacityError(f"the disk under {self.root} is full") from exc
                raise StoreError(f"cannot store blob {sha256[:12]}: {exc}") from exc
            finally:
                tmp.unlink(missing_ok=True)
            self.adopt(sha256, size)
        return BlobRef(sha256, size)

    def adopt(self, sha256: str, size: int) -> None:
        """Record the row of a blob file that is in place (idempotent)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO blobs (sha256, size, created_at) VALUES (?, ?, ?)",
                (sha256, size, time.time()),
            )

    def write_stream(
        self,
        reader: BinaryIO,
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        hint: str = "blob",
        on_bytes: Callable[[int], None] | None = None,
    ) -> BlobRef:
        """Copy a stream into a new blob, hashing on the way, and commit it."""
        tmp = self.new_tmp(hint)
        digest = hashlib.sha256()
        size = 0
        buf = bytearray(COPY_CHUNK)
        view = memoryview(buf)
        try:
            with open(tmp, "wb") as out:
                while True:
                    n = reader.readinto(view)  # type: ignore[attr-defined]
                    if not n:
                        break
                    chunk = view[:n]
                    digest.update(chunk)
                    out.write(chunk)
                    size += n
                    if on_bytes is not None:
                        on_bytes(n)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if disk_full(exc):
                raise CapacityError(f"the disk under {self.tmp_dir} is full") from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sha = digest.hexdigest()
        if expected_size is not None and size != expected_size:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"expected {expected_size} bytes, read {size}")
        if expected_sha256 is not None and sha != expected_sha256.lower():
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"sha256 mismatch: expected {expected_sha256}, got {sha}")
        return self.commit(tmp, sha, size)

    def rehash(self, sha256: str) -> str:
        """The sha256 of the bytes on disk now (for verify)."""
        digest = hashlib.sha256()
        with open(self.path(sha256), "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def files_on_disk(self) -> dict[str, int]:
        """Every blob file present under ``blobs/sha256``, with its size."""
        found: dict[str, int] = {}
        if not self.root.exists():
            return found
        for fan in os.scandir(self.root):
            if not fan.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fan.path):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    found[entry.name] = st.st_size
        return found

    def unlink(self, sha256: str) -> None:
        path = self.path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
