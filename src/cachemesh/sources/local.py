"""Local paths: a directory or a file, including NFS/NAS mounts.

``file:///mnt/nas/models/qwen`` or a plain path. A symlink is followed only
when its target stays inside the source root (a model directory that links
shards between its own subfolders works); a symlink that points outside is
skipped with a warning in the cache's events, unless the source is created with
``follow_symlinks=True`` (an HF cache snapshot, whose files link to
``../../blobs``, needs it). Sockets, FIFOs and devices are skipped, as are names
the store refuses (backslashes, control characters).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlparse

from ..errors import (
    AccessDeniedError,
    InvalidInputError,
    SourceError,
    SourceNotFoundError,
    UnsafePathError,
)
from ..store.buckets import searchable_by_all
from ..store.names import check_relpath
from .base import Listing, RemoteFile, Source, check_options

if TYPE_CHECKING:
    from ..config import Settings


def _origin_tag(st: os.stat_result) -> str:
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns};ino={st.st_ino}"


def _restricted(path: str, st: os.stat_result, memo: dict[str, bool]) -> bool:
    """Not every local user may read ``path``: no read bit for others on the file, or
    a folder on its (resolved) path they cannot pass through."""
    return not st.st_mode & stat.S_IROTH or not searchable_by_all(os.path.dirname(path), memo)


class LocalSource(Source):
    schemes = ("file",)
    options = ("follow_symlinks",)

    def __init__(self, root: Path, *, follow_symlinks: bool = False) -> None:
        self.root = root
        self.follow_symlinks = follow_symlinks
        self.uri = root.as_uri()

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Settings) -> LocalSource:
        check_options(cls, options)
        if uri.startswith("file:"):
            parsed = urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise InvalidInputError(f"file:// URIs must be local, got host {parsed.netloc!r}")
            raw = unquote(parsed.path)
        else:
            raw = uri
        if not raw:
            raise InvalidInputError("empty local path")
        if "\x00" in raw:  # found by the fuzzer: os.stat raised ValueError, a 500
            raise InvalidInputError("a local path cannot contain a NUL character")
        root = Path(os.path.abspath(os.path.expanduser(raw)))
        return cls(root, follow_symlinks=bool(options.get("follow_symlinks")))

    def default_name(self) -> str:
        from .base import safe_name

        return safe_name(self.root.name)

    def _check_root(self) -> os.stat_result:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise SourceNotFoundError(f"local source {self.root} does not exist") from None
        except PermissionError:
            raise AccessDeniedError(f"local source {self.root} is not readable") from None
        except OSError as exc:
            raise SourceError(f"local source {self.root}: {exc}") from exc
        if not os.access(self.root, os.R_OK):
            raise AccessDeniedError(f"local source {self.root} is not readable")
        return st

    def list_files(self) -> Listing:
        st = self._check_root()
        memo: dict[str, bool] = {}
        if stat.S_ISREG(st.st_mode):
            real = os.path.realpath(self.root)
            return Listing([RemoteFile(self.root.name, st.st_size, origin_tag=_origin_tag(st),
                                       locator=real, restricted=_restricted(real, st, memo))])
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidInputError(f"local source {self.root} is neither a file nor a directory")
        listing = Listing(files=[])
        real_root = os.path.realpath(self.root)
        self._walk(real_root, "", real_root, listing, {(st.st_dev, st.st_ino)}, memo)
        listing.files.sort(key=lambda f: f.path)
        return listing

    def _inside(self, real: str, real_root: str) -> bool:
        return real == real_root or real.startswith(real_root.rstrip("/") + "/")

    def _walk(
        self, directory: str, prefix: str, real_root: str, listing: Listing, seen: set,
        memo: dict[str, bool],
    ) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except PermissionError:
            listing.notes.append(f"skipped unreadable directory {prefix or '.'}")
            return
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            try:
                check_relpath(rel, "file path")
            except UnsafePathError as exc:
                listing.notes.append(f"skipped {rel!r}: {exc}")
                continue
            full = entry.path
            if entry.is_symlink():
                real = os.path.realpath(full)
                if not self.follow_symlinks and not self._inside(real, real_root):
                    listing.notes.append(
                        f"skipped symlink {rel} -> {os.readlink(full)}: it points outside the source"
                    )
                    continue
                full = real
            try:
                st = os.stat(full)
            except OSError as exc:
                listing.notes.append(f"skipped {rel}: {exc.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    listing.notes.append(f"skipped {rel}: directory loop")
                    continue
                self._walk(full, rel + "/", real_root, listing, seen | {key}, memo)
            elif stat.S_ISREG(st.st_mode):
                listing.files.append(
                    RemoteFile(rel, st.st_size, origin_tag=_origin_tag(st), locator=full,
                               restricted=_restricted(full, st, memo))
                )
            else:
                listing.notes.append(f"skipped {rel}: not a regular file")

    def open(self, file: RemoteFile) -> BinaryIO:
        try:
            # O_NOFOLLOW: the locator was resolved at listing time; a symlink
            # swapped in since must not redirect the read.
            fd = os.open(file.locator, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceNotFoundError(f"{file.locator} disappeared from the source") from None
        except PermissionError:
            raise AccessDeniedError(f"{file.locator} is not readable") from None
        except OSError as exc:
            raise SourceError(f"cannot read {file.locator}: {exc}") from exc
        st = os.fstat(fd)
        if _origin_tag(st) != file.origin_tag:
            os.close(fd)
            raise SourceError(f"{file.locator} changed while it was being pulled; pull again")
        return os.fdopen(fd, "rb", buffering=0)
