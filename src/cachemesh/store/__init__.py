"""The node-local store: blobs, views, metadata and locks under one directory.

Layout of ``$CACHEMESH_HOME`` (each part is documented where it is written)::

    meta.db, meta.db-wal       metadata (store/db.py)
    blobs/sha256/ab/abcd…      content-addressed, read-only blobs (store/blobs.py)
    buckets/<bucket>/<path>/…  hardlink views, one per cache (store/views.py); a
                               protected bucket's folder is private (store/buckets.py)
    hub/models--org--name/…    Hugging Face cache layout (store/hub_layout.py)
    tmp/                       partial downloads and staging links
    locks/                     advisory locks (store/locks.py)

The store knows nothing of sources, HTTP or serving: it takes bytes in,
verifies them, and links them where they are read.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntegrityError, StoreError
from .blobs import BlobRef, BlobStore
from .buckets import Buckets
from .db import BUSY_TIMEOUT_S, Database
from .locks import FileLock, is_locked, private_dirs
from .names import check_name
from .views import Views

__all__ = ["CORRUPT_EVENT", "Store", "BlobRef", "Problem", "FileLock"]


@dataclass(frozen=True)
class Problem:
    """One inconsistency found by :meth:`Store.verify`."""

    kind: str  # missing-blob, corrupt-blob, size-mismatch, missing-file, unlinked-file, stray-file, orphan-blob
    subject: str
    detail: str
    cache: str | None = None


# The event a model load leaves on every cache holding a blob it found changed
# (Caches.mark_corrupt, load/integrity.py): "blob sha256:<hex> ...".
CORRUPT_EVENT = "corrupt-blob"


def _blob_named(message: str) -> str | None:
    at = message.find("blob sha256:")
    sha = message[at + 12:at + 76] if at >= 0 else ""
    return sha if len(sha) == 64 and all(c in "0123456789abcdef" for c in sha) else None


class Store:
    def __init__(self, home: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.home = Path(home)
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            # Private parts are made private: never created open and narrowed later.
            self.locks_dir = private_dirs(self.home / "locks")
            db_file = self.home / "meta.db"
            if not db_file.exists():  # SQLite gives -wal and -shm the mode of this file
                os.close(os.open(db_file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.home}: {exc}") from exc
        self.db = Database(self.home / "meta.db", busy_timeout=busy_timeout)
        self.blobs = BlobStore(self.home, self.db, lambda: self.blob_lock(shared=True))
        self.buckets = Buckets(self.home, self.db)
        self.views = Views(self.home, bucket_mode=self.buckets.mode)

    # -- locks -----------------------------------------------------------------

    def lock(self, kind: str, key: str, *, shared: bool = False) -> FileLock:
        if kind == "fetch":
            key = hashlib.sha256(key.encode()).hexdigest()
        else:
            check_name(key, kind)
        return FileLock(self.locks_dir / kind / f"{key}.lock", shared=shared)

    def blob_lock(self, *, shared: bool) -> FileLock:
        return FileLock(self.locks_dir / "blobs.lock", shared=shared)

    def in_use(self, cache: str) -> bool:
        return is_locked(self.locks_dir / "use" / f"{check_name(cache)}.lock")

    # -- files of caches -------------------------------------------------------

    def _record_file(
        self, cache: str, relpath: str, ref: BlobRef, origin_tag: str | None
    ) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO blobs (sha256, size, created_at) VALUES (?, ?, ?)",
                (ref.sha256, ref.size, time.time()),
            )
            conn.execute(
                "INSERT INTO files (cache, path, sha256, size, origin_tag, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (cache, path) DO UPDATE SET sha256=excluded.sha256,"
                " size=excluded.size, origin_tag=excluded.origin_tag, added_at=excluded.added_at",
                (cache, relpath, ref.sha256, ref.size, origin_tag, time.time()),
            )

    def add_file(
        self,
        cache: str,
        bucket: str,
        path: str,
        relpath: str,
        *,
        tmp: Path | None = None,
        ref: BlobRef,
        origin_tag: str | None = None,
    ) -> bool:
        """Make ``relpath`` of a cache point at blob ``ref`` and appear in its view.

        With ``tmp``, the freshly written and hashed file is committed as the
        blob first. Without it, the blob must already be present; returns False
        (and changes nothing) when it is not, so the caller fetches it.

        Order: blob file, blob row, file row, view link. A crash before the link
        leaves a row without its link: the pull is unfinished (its cache is not
        Available, and ``Caches.verify`` says nothing of it) and pulling again
        links it. The other order would let a view show a file that no row names.
        """
        with self.blob_lock(shared=True):
            if tmp is not None:
                ref = self.blobs.commit(tmp, ref.sha256, ref.size)
            elif not self.blobs.has(ref.sha256, ref.size):
                return False
            self._record_file(cache, relpath, ref, origin_tag)
            self.views.place(bucket, path, relpath, self.blobs.path(ref.sha256))
        return True

    def file_rows(self, cache: str) -> dict[str, dict]:
        rows = self.db.query("SELECT * FROM files WHERE cache = ?", (cache,))
        return {r["path"]: dict(r) for r in rows}

    def forget_files(self, cache: str, paths: list[str]) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "DELETE FROM files WHERE cache = ? AND path = ?", [(cache, p) for p in paths]
            )

    # -- collection ------------------------------------------------------------

    def collect_blobs(self) -> tuple[int, int]:
        """Delete blobs no cache references, and blob files without a row.

        Returns (count, bytes) freed. Holds the blob lock exclusively, so no
        pull can adopt a blob while it goes.
        """
        count = freed = 0
        with self.blob_lock(shared=False):
            with self.db.transaction() as conn:
                rows = conn.execute(
                    "SELECT sha256, size FROM blobs b WHERE NOT EXISTS"
                    " (SELECT 1 FROM files f WHERE f.sha256 = b.sha256)"
                ).fetchall()
                conn.executemany("DELETE FROM blobs WHERE sha256 = ?", [(r[0],) for r in rows])
            for sha, size in rows:
                self.blobs.unlink(sha)
                count += 1
                freed += size
            known = {r[0] for r in self.db.query("SELECT sha256 FROM blobs")}
            for sha, size in self.blobs.files_on_disk().items():
                if sha not in known:
                    self.blobs.root.joinpath(sha[:2], sha).unlink(missing_ok=True)
                    count += 1
                    freed += size
        return count, freed

    def recover(self) -> tuple[int, int]:
        """Repair what a crash can leave: returns (blobs adopted, blobs dropped).

        A process killed between linking a blob and recording its row leaves
        a blob file without a row. Its name was given only after its bytes were
        verified, but the file is re-hashed anyway before it is adopted;
        anything else in ``blobs/`` is dropped. Staging links that a crash left
        under ``tmp/links`` go too.
        """
        adopted = dropped = 0
        with self.blob_lock(shared=False):
            known = {r[0] for r in self.db.query("SELECT sha256 FROM blobs")}
            for sha, size in self.blobs.files_on_disk().items():
                if sha in known:
                    continue
                path = self.blobs.root / sha[:2] / sha
                try:
                    good = self.blobs.rehash(sha) == sha
                except (OSError, IntegrityError):
                    good = False
                if good:
                    self.blobs.adopt(sha, size)
                    adopted += 1
                else:
                    path.unlink(missing_ok=True)
                    dropped += 1
        cutoff = time.time() - 60
        for link in (self.home / "tmp" / "links").glob("*.link"):
            try:
                if link.lstat().st_mtime < cutoff:
                    link.unlink()
            except FileNotFoundError:
                pass
        return adopted, dropped

    def physical_bytes(self) -> int:
        row = self.db.query("SELECT COALESCE(SUM(size), 0) AS n FROM blobs")[0]
        return int(row["n"])

    def collect_tmp(self, older_than_s: float) -> int:
        """Remove partial files under ``tmp/`` not touched for a while; returns bytes."""
        freed = 0
        cutoff = time.time() - older_than_s
        for entry in self.blobs.tmp_dir.rglob("*"):
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue
            if entry.is_file() and st.st_mtime < cutoff:
                entry.unlink(missing_ok=True)
                freed += st.st_size
        return freed

    # -- verification ----------------------------------------------------------

    def verify(self, caches: list[dict] | None = None, *, rehash: bool = True) -> list[Problem]:
        """Check files against the database; returns every problem found.

        For every blob row: the file exists with the right size and (with
        ``rehash``) the right sha256. For every file row of the given caches
        (all by default): its blob exists and the view holds a hardlink to it.
        Extra entries in a view, and blob files without a row, are reported too.
        """
        problems: list[Problem] = []
        on_disk = self.blobs.files_on_disk()
        blob_rows = {r["sha256"]: r["size"] for r in self.db.query("SELECT sha256, size FROM blobs")}
        reported = set() if rehash else self.reported_corrupt()
        for sha, size in blob_rows.items():
            if sha not in on_disk:
                problems.append(Problem("missing-blob", sha, "row without a file"))
            elif on_disk[sha] != size:
                problems.append(
                    Problem("size-mismatch", sha, f"{on_disk[sha]} bytes on disk, {size} expected")
                )
            elif (rehash or sha in reported) and self.blobs.rehash(sha) != sha:
                problems.append(Problem("corrupt-blob", sha, "bytes do not match their sha256"))
        for sha in on_disk.keys() - blob_rows.keys():
            problems.append(Problem("orphan-blob", sha, "file without a row (gc removes it)"))
        if caches is None:
            caches = [dict(r) for r in self.db.query("SELECT name, bucket, path FROM caches")]
        for cache in caches:
            problems.extend(self._verify_view(cache, blob_rows))
        return problems

    def reported_corrupt(self) -> set[str]:
        """Blobs a model load found changed (events of kind :data:`CORRUPT_EVENT`):
        verify re-hashes them even when it re-hashes nothing else."""
        rows = self.db.query("SELECT message FROM events WHERE kind = ?", (CORRUPT_EVENT,))
        return {sha for r in rows if (sha := _blob_named(r["message"])) is not None}

    def _verify_view(self, cache: dict, blob_rows: dict[str, int]) -> Iterator[Problem]:
        name, bucket, path = cache["name"], cache["bucket"], cache["path"]
        rows = self.file_rows(name)
        present = self.views.files(bucket, path)
        view = self.views.dir(bucket, path)
        for rel, row in rows.items():
            sha = row["sha256"]
            if sha not in blob_rows:
                yield Problem("missing-blob", rel, f"file row points at unknown blob {sha}", name)
                continue
            st = present.get(rel)
            if st is None:
                yield Problem("missing-file", rel, f"not in view {view}", name)
                continue
            try:
                blob_st = self.blobs.path(sha).stat()
            except FileNotFoundError:
                continue  # reported as missing-blob above
            if (st.st_ino, st.st_dev) != (blob_st.st_ino, blob_st.st_dev):
                yield Problem("unlinked-file", rel, "view file is not a hardlink to its blob", name)
        for rel in present.keys() - rows.keys():
            yield Problem("stray-file", rel, f"in view {view} but not in the cache", name)

    @contextmanager
    def using(self, cache: str) -> Iterator[None]:
        """Hold a cache open: gc, eviction and rm leave it alone meanwhile."""
        lock = FileLock(self.locks_dir / "use" / f"{check_name(cache)}.lock", shared=True)
        with lock:
            yield
