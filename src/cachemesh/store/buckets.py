"""Protected buckets: a token of its own, and directory modes that keep others out.

A bucket is protected by a row in the ``buckets`` table (store/db.py). The row
holds a random salt and ``sha256(salt + token)``; the token itself is shown
once, when it is made, and never stored. Tokens made here carry 256 random bits
(``cmb_`` + 43 url-safe characters), so a fast hash is enough: a slow key
derivation would only slow down every request that presents one. A token a
user brings must be at least :data:`MIN_TOKEN_LENGTH` printable characters.

On disk, under ``$CACHEMESH_HOME``::

    buckets/<bucket>/      0755: any local user, and any container that mounts it,
                           reads the views of an open bucket
    buckets/<protected>/   0700: only the store's owner
    blobs/ tmp/ locks/     0700, always: nothing outside cachemesh reads them
    meta.db, -wal, -shm    0600, always: it names every cache and its source
    hub/                   0755, but caches of protected buckets never appear in it
                           (see cachemesh.caches.hub_sync)

Why directories: a view file is a hardlink to its blob, one inode with mode 0444
wherever it is linked, so the file's own mode cannot tell a protected view from
an open one. What keeps another user away from an inode is the search (x)
permission of the directories on every path that leads to it: ``buckets/<b>``
on the view's path, ``blobs/`` on the blob's own path, ``tmp/links/`` (staging)
on the way in, and no link at all under ``hub/``. A bytes-identical file in an
open bucket shares the inode and is readable there: those bytes are public
anyway. A process that opened a file before its bucket was protected keeps its
descriptor, so protect a bucket before pulling into it.

Order, so that a crash cannot lie: :meth:`Buckets.protect` narrows the
directory first and commits the row after; :meth:`Buckets.unprotect` deletes
the row first and widens after. The disk is never more open than the database
says. :meth:`Buckets.secure` (run whenever a :class:`~cachemesh.caches.Caches`
opens the store) narrows whatever a crash or an older cachemesh left wider.

Rejected: a separate store (home) per protected bucket. It gives up
deduplication across buckets and the one database that gc and eviction plan on.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConflictError, InvalidInputError, NotFoundError, StoreError
from .db import Database
from .names import check_name

log = logging.getLogger("cachemesh.store")

OPEN_MODE = 0o755
PRIVATE_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
MIN_TOKEN_LENGTH = 24
MAX_TOKEN_LENGTH = 512
TOKEN_PREFIX = "cmb_"
# How long a process trusts its copy of the table before reading it again: a bucket
# protected by `cachemesh bucket protect` in another process is enforced within this.
REFRESH_S = 1.0


@dataclass(frozen=True)
class _Key:
    salt: bytes
    digest: bytes


def _digest(salt: bytes, token: str) -> bytes:
    return hashlib.sha256(salt + token.encode("utf-8", "surrogateescape")).digest()


def new_token() -> str:
    """A fresh bucket token: 256 random bits, with a prefix secret scanners can match."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_token(token: str) -> str:
    """A token a user brings: long enough, and safe to carry in an HTTP header."""
    if not isinstance(token, str):
        raise InvalidInputError("a bucket token must be text")
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
        raise InvalidInputError(
            f"a bucket token must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} characters long")
    if any(not (33 <= ord(c) <= 126) or c == "," for c in token):
        raise InvalidInputError(
            "a bucket token may hold printable ASCII characters only, without spaces or ','")
    return token


class Buckets:
    """Which buckets are protected, who opens them, and the modes on disk."""

    def __init__(self, home: Path, db: Database, *, refresh_s: float = REFRESH_S) -> None:
        self.home = Path(home)
        self.db = db
        self.refresh_s = refresh_s
        self._keys: dict[str, _Key] = {}
        self._loaded_at = -float("inf")
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------

    def _snapshot(self) -> dict[str, _Key]:
        now = time.monotonic()
        if now - self._loaded_at >= self.refresh_s:
            rows = self.db.query("SELECT name, salt, digest FROM buckets")
            with self._lock:
                self._keys = {r["name"]: _Key(bytes.fromhex(r["salt"]), bytes.fromhex(r["digest"]))
                              for r in rows}
                self._loaded_at = now
        return self._keys

    def _invalidate(self) -> None:
        with self._lock:
            self._loaded_at = -float("inf")

    def protected(self) -> frozenset[str]:
        return frozenset(self._snapshot())

    def is_protected(self, bucket: str) -> bool:
        return bucket in self._snapshot()

    def opens(self, bucket: str, tokens: Iterable[str]) -> bool:
        """Whether one of ``tokens`` is the token of protected ``bucket`` (constant time
        in the token's content; False for an open bucket, which needs none)."""
        key = self._snapshot().get(bucket)
        if key is None:
            return False
        found = False
        for token in tokens:
            # No early exit: every presented token costs the same.
            found |= hmac.compare_digest(_digest(key.salt, token), key.digest)
        return found

    def mode(self, bucket: str) -> int:
        """The mode of ``buckets/<bucket>`` (views.py creates bucket directories with it)."""
        return PRIVATE_MODE if self.is_protected(bucket) else OPEN_MODE

    # -- writing -----------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        return self.home / "buckets" / check_name(bucket, "bucket")

    def protect(self, bucket: str, token: str | None = None, *,
                before_commit: Callable[[], None] | None = None) -> str:
        """Protect ``bucket`` and return its token (made here unless given).

        ``before_commit`` runs after the folder is private and before the row is
        written: whatever else must stop showing the bucket's files goes there.
        """
        check_name(bucket, "bucket")
        token = new_token() if token is None else check_token(token)
        if self.db.query("SELECT 1 FROM buckets WHERE name = ?", (bucket,)):
            raise ConflictError(f"bucket {bucket!r} is protected already; rotate its token instead")
        self.secure()
        self._narrow(bucket)
        if before_commit is not None:
            before_commit()
        self._write(bucket, token, insert=True)
        return token

    def rotate(self, bucket: str, token: str | None = None) -> str:
        """Give a protected bucket a new token; the old one stops working."""
        check_name(bucket, "bucket")
        token = new_token() if token is None else check_token(token)
        if not self.db.query("SELECT 1 FROM buckets WHERE name = ?", (bucket,)):
            raise NotFoundError(f"bucket {bucket!r} is not protected")
        self._narrow(bucket)
        self._write(bucket, token, insert=False)
        return token

    def unprotect(self, bucket: str) -> None:
        check_name(bucket, "bucket")
        with self.db.transaction() as conn:
            gone = conn.execute("DELETE FROM buckets WHERE name = ?", (bucket,)).rowcount
        self._invalidate()
        if not gone:
            raise NotFoundError(f"bucket {bucket!r} is not protected")
        path = self._bucket_dir(bucket)
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, OPEN_MODE)

    def _write(self, bucket: str, token: str, *, insert: bool) -> None:
        salt = secrets.token_bytes(16)
        digest = _digest(salt, token)
        now = time.time()
        with self.db.transaction() as conn:
            if insert:
                try:
                    conn.execute(
                        "INSERT INTO buckets (name, salt, digest, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, ?)", (bucket, salt.hex(), digest.hex(), now, now))
                except sqlite3.IntegrityError:  # another process protected it just now
                    raise ConflictError(f"bucket {bucket!r} is protected already") from None
            else:
                conn.execute("UPDATE buckets SET salt = ?, digest = ?, updated_at = ?"
                             " WHERE name = ?", (salt.hex(), digest.hex(), now, bucket))
        self._invalidate()

    def _narrow(self, bucket: str) -> None:
        path = self._bucket_dir(bucket)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path, PRIVATE_MODE)
            except FileExistsError:
                pass
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"{path} is not a directory; refusing to protect through it")
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(path, PRIVATE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot make {path} private: {exc}") from exc

    def secure(self) -> None:
        """Narrow every mode this module promises (idempotent; never widens)."""
        for name in ("blobs", "tmp", "locks"):
            _narrow_path(self.home / name, PRIVATE_MODE)
        for suffix in ("", "-wal", "-shm"):
            _narrow_path(self.home / f"meta.db{suffix}", PRIVATE_FILE_MODE)
        for bucket in self.protected():
            self._narrow(bucket)


def searchable_by_all(directory: str | os.PathLike[str],
                      memo: dict[str, bool] | None = None) -> bool:
    """Whether every local user may pass through ``directory`` and each folder above
    it (the ``x`` bit for others on each), symlinks resolved; ``memo`` caches answers."""
    real = os.path.realpath(directory)
    memo = {} if memo is None else memo
    if real not in memo:
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return False
        parent = os.path.dirname(real)
        memo[real] = bool(mode & stat.S_IXOTH) and (
            parent == real or searchable_by_all(parent, memo))
    return memo[real]


def _narrow_path(path: Path, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        except OSError as exc:  # a store owned by another user: say so, do not fail reads
            log.warning("cannot narrow the mode of %s: %s", path, exc)
