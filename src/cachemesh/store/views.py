"""Hardlink views: the plain directories that programs and containers read.

On disk, under ``$CACHEMESH_HOME``::

    buckets/<bucket>/<path>/<file>   one hardlink per file of a cache, pointing
                                     at its blob (same inode, mode 0444)
    buckets/<bucket>/                0755, or 0700 when the bucket is protected
                                     (store/buckets.py says why that is enough)

A view can be bind-mounted read-only into a container (a Kubernetes hostPath)
and read like any local directory: there is no symlink to resolve, so nothing
points outside the mount. Each file appears atomically: it is linked under
``tmp/links/`` and renamed into place, so a reader sees either no file or the
whole verified file, never a partial one.

Rejected: symlinks into ``blobs/``. They break as soon as the view is mounted
without the blob directory, and a program that resolves them escapes the view.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import StoreError, UnsafePathError
from .buckets import searchable_by_all
from .locks import private_dirs
from .names import check_name, check_relpath


def _ensure_dirs(root: Path, rel_parts: list[str], mode: int = 0o755) -> Path:
    """Create ``root/a/b/...`` refusing to walk through a symlink or a file."""
    current = root
    for part in rel_parts:
        current = current / part
        try:
            os.mkdir(current, mode)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise UnsafePathError(
                    f"{current} exists and is not a directory; refusing to write through it"
                ) from None
    return current


def link_atomic(blob: Path, target: Path, staging: Path) -> None:
    """Make ``target`` a hardlink to ``blob``, replacing what was there atomically."""
    try:
        st, blob_st = os.lstat(target), os.stat(blob)
        if (st.st_ino, st.st_dev) == (blob_st.st_ino, blob_st.st_dev):
            return  # already this very hardlink (a symlink to the blob does not count)
    except OSError:
        pass
    private_dirs(staging)  # under tmp/, private like it
    tmp = staging / f"{uuid.uuid4().hex}.link"
    os.link(blob, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Views:
    def __init__(self, home: Path, bucket_mode: Callable[[str], int] | None = None) -> None:
        self.root = home / "buckets"
        self.staging = home / "tmp" / "links"
        self.root.mkdir(parents=True, exist_ok=True)
        # The mode of a bucket's own folder: 0700 for a protected bucket (store/buckets.py).
        self._bucket_mode = bucket_mode or (lambda bucket: 0o755)

    def _bucket_dir(self, bucket: str) -> Path:
        mode = self._bucket_mode(check_name(bucket, "bucket"))
        path = _ensure_dirs(self.root, [bucket], mode)
        if mode != 0o755 and stat.S_IMODE(os.lstat(path).st_mode) & ~mode:
            os.chmod(path, mode)  # protected after the folder was made, by another process
        return path

    def readable_by_all(self, bucket: str) -> bool:
        """Whether any local user reads what a view of ``bucket`` shows: an open bucket
        in a store that every local user can reach (store/buckets.py)."""
        if not self._bucket_mode(check_name(bucket, "bucket")) & stat.S_IXOTH:
            return False
        folder = self.root / bucket
        try:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            pass  # made with the bucket's mode when its first file lands
        return searchable_by_all(self.root)

    def dir(self, bucket: str, path: str) -> Path:
        return self.root / check_name(bucket, "bucket") / check_relpath(path, absolute_ok=True)

    def place(self, bucket: str, path: str, relpath: str, blob: Path) -> Path:
        """Link one file of a cache into its view."""
        parts = check_relpath(relpath, "file path").split("/")
        bucket_dir = self._bucket_dir(bucket)
        view = _ensure_dirs(bucket_dir, check_relpath(path, absolute_ok=True).split("/"))
        parent = _ensure_dirs(view, parts[:-1])
        target = parent / parts[-1]
        if target.is_dir() and not target.is_symlink():
            # A directory left by an older listing where a file now lives.
            shutil.rmtree(target)
        try:
            link_atomic(blob, target, self.staging)
        except OSError as exc:
            raise StoreError(f"cannot link {relpath} into view {view}: {exc}") from exc
        return target

    def files(self, bucket: str, path: str) -> dict[str, os.stat_result]:
        """Every entry in a view (relative path -> lstat), symlinks and strays included."""
        view = self.dir(bucket, path)
        found: dict[str, os.stat_result] = {}
        if not view.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(view):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                full = os.path.join(dirpath, name)
                found[os.path.relpath(full, view)] = os.lstat(full)
        return found

    def prune(self, bucket: str, path: str, keep: set[str]) -> list[str]:
        """Remove files of a view that are not in ``keep``; returns what went."""
        view = self.dir(bucket, path)
        removed = []
        for rel in self.files(bucket, path):
            if rel not in keep:
                (view / rel).unlink(missing_ok=True)
                removed.append(rel)
        # Drop directories left empty, deepest first.
        if view.is_dir():
            for dirpath, _, _ in sorted(os.walk(view), key=lambda w: -len(w[0])):
                if dirpath != str(view) and not os.listdir(dirpath):
                    os.rmdir(dirpath)
        return removed

    def remove(self, bucket: str, path: str) -> None:
        """Delete a whole view (the blobs stay) and its empty parents."""
        view = self.dir(bucket, path)
        if view.is_symlink():
            view.unlink()
        elif view.exists():
            shutil.rmtree(view)
        parent = view.parent
        while parent != self.root and parent.is_dir() and not os.listdir(parent):
            parent.rmdir()
            parent = parent.parent
