"""Validation of every name that becomes a path inside the store.

Cache names, buckets, view paths and the relative paths of files that an origin
lists all end up as directory entries under ``$CACHEMESH_HOME``. Each is checked
here before anything touches the disk, so that no input (``..``, an absolute
path, NUL, a backslash, a control character) can lead a write outside the store.
"""

from __future__ import annotations

import re

from ..errors import UnsafePathError

# Cache and bucket names: DNS-label-like, as object stores and Kubernetes use.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_COMPONENT = 255
_MAX_PATH = 4096


def check_name(value: str, what: str = "name") -> str:
    """A cache or bucket name: letters, digits, '.', '_' and '-', at most 128."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in {".", ".."}:
        raise UnsafePathError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_relpath(value: str, what: str = "path", *, absolute_ok: bool = False) -> str:
    """A relative POSIX path with safe components; returns it normalised.

    With ``absolute_ok`` a leading '/' is accepted and dropped (``/models/qwen``
    is the ECI style for a cache path); file paths from an origin may not be
    absolute. Empty components and '.' are dropped; '..' is refused.
    """
    if not isinstance(value, str):
        raise UnsafePathError(f"invalid {what}: {value!r} is not a string")
    if value.startswith("/") and not absolute_ok:
        raise UnsafePathError(f"invalid {what} {value!r}: absolute paths are not allowed")
    if len(value) > _MAX_PATH:
        raise UnsafePathError(f"invalid {what}: longer than {_MAX_PATH} characters")
    if "\\" in value:
        raise UnsafePathError(f"invalid {what} {value!r}: backslashes are not allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UnsafePathError(f"invalid {what} {value!r}: control characters are not allowed")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"invalid {what} {value!r}: empty")
    for part in parts:
        if part == "..":
            raise UnsafePathError(f"invalid {what} {value!r}: '..' is not allowed")
        if len(part.encode()) > _MAX_COMPONENT:
            raise UnsafePathError(f"invalid {what} {value!r}: a component is too long")
    return "/".join(parts)


def is_within(path: str, prefix: str) -> bool:
    """Whether relative path ``path`` equals ``prefix`` or lies below it."""
    return path == prefix or path.startswith(prefix + "/")
