"""What a local source may be: the checks made before a cache copies local files.

Two rules, both about the store showing files to readers who could not read them:
:func:`check_source` keeps the store's own files (and, over the API, anything outside
the configured source roots) from becoming a cache; :func:`check_restricted` keeps a
file that only some local users may read out of a view that every one can read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ForbiddenError, UnsafePathError
from ..sources import RemoteFile, Source
from ..store import Store
from .spec import CacheSpec


def check_source(store: Store, source: Source, bucket: str,
                 roots: tuple[Path, ...] | None = None) -> None:
    """Refuse a local source that would copy the store's own files, or a protected
    bucket's files into another bucket; with ``roots`` (a caller over the API), any
    other local path outside them, every one when ``roots`` is empty.

    Symlinks are resolved first, so a link that points into the store is judged
    by where it leads. A view (``buckets/<bucket>/...``) or ``hub/`` may be a
    source, from the API too: they hold what cachemesh itself shows; so may a
    conversion's staging folder, for the operator. Everything else there (blobs/,
    tmp/, meta.db, the whole store) may not. ``roots=None``: the operator's own
    command (the CLI, ``--model``), not checked against roots.
    """
    root = getattr(source, "root", None)
    if not isinstance(root, Path):
        return  # not a local path
    try:
        real = Path(os.path.realpath(root))
        home = Path(os.path.realpath(store.home))
        allowed = None if roots is None else [Path(os.path.realpath(r)) for r in roots]
    except (OSError, ValueError) as exc:
        raise UnsafePathError(f"local source {root!r}: {exc}") from None
    if real != home and home not in real.parents:
        if allowed is None or any(real == r or r in real.parents for r in allowed):
            return
        if not allowed:
            raise UnsafePathError(
                f"local source {root}: this server takes no local path over its API"
                " unless CACHEMESH_SERVE_SOURCE_ROOTS names the directories it may"
                " come from")
        raise UnsafePathError(
            f"local source {root} is outside the directories this server deploys from"
            " (CACHEMESH_SERVE_SOURCE_ROOTS)")
    parts = real.relative_to(home).parts
    if len(parts) >= 2 and parts[0] == "hub":
        return
    if len(parts) >= 3 and parts[:2] == ("tmp", "convert") and roots is None:
        return  # a conversion's staged output (convert/service.py)
    if len(parts) >= 2 and parts[0] == "buckets":
        if store.buckets.is_protected(parts[1]) and parts[1] != bucket:
            raise UnsafePathError(
                f"local source {root} lies in protected bucket {parts[1]!r}; a cache of"
                " its files must be in that bucket too")
        return
    raise UnsafePathError(
        f"local source {root} lies in the store's own files; only views"
        " (buckets/<bucket>/...) and hub/ may be a source")


def check_restricted(store: Store, spec: CacheSpec, source: Source,
                     files: list[RemoteFile]) -> None:
    """Never make a local file that only some local users may read readable by all.

    Refused rather than copied with its restriction kept: a view file is a hardlink
    to a blob shared by every cache with those bytes (one inode, 0444), so what
    keeps others out is the folder of the view (store/buckets.py). A protected
    bucket's is 0700, and so is any bucket of a store that others cannot reach."""
    closed = [f.path for f in files if f.restricted]
    if not closed or not store.views.readable_by_all(spec.bucket):
        return
    root = getattr(source, "root", None)
    home = os.path.realpath(store.home)
    if isinstance(root, Path) and os.path.realpath(root).startswith(home + os.sep):
        return  # the store's own files (a conversion's output): check_source rules them
    shown = ", ".join(closed[:3]) + (f" and {len(closed) - 3} more" if len(closed) > 3 else "")
    raise ForbiddenError(
        f"cache {spec.name!r}: {source.display_uri} holds files that not every local user"
        f" may read ({shown}: their mode or a folder on their path keeps others out), and"
        f" a view in open bucket {spec.bucket!r} would make them readable by all. Pull"
        " into a protected bucket (cachemesh bucket protect NAME; its folder is 0700),"
        " or make the files readable (chmod o+r) if they are meant to be")
