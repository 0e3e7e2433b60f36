"""Which pages of a file are in the page cache, without reading them.

``mincore(2)`` on a shared, read-only mapping of the file that is never
touched: the mapping costs no memory and the call does no I/O. Linux answers
for a file mapping only if the caller owns the file, may write it, or is
privileged (a side-channel guard since Linux 5.2); for anyone else it reports
every page absent, so :func:`open_residency` returns None for such files and
the reader falls back to plain page-cache reads.

Rejected: probing with ``preadv(..., RWF_NOWAIT)``. It was tried first and
measured: on a miss the kernel still starts readahead before it answers
``EAGAIN``, so on a cold file the probe itself fills the page cache and races
the direct reads; it also refuses cached pages that carry a readahead mark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path

PAGE = mmap.PAGESIZE
# mincore's vector has one byte per page; only the lowest bit is defined.
_RESIDENT_BIT = bytes((b & 1) for b in range(256))

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            _libc = libc
        except (OSError, AttributeError):
            return None
    return _libc


def _may_ask(path: Path, st: os.stat_result) -> bool:
    euid = os.geteuid()
    return euid == 0 or st.st_uid == euid or os.access(path, os.W_OK)


class Residency:
    """Answers "which pages of [start, end) are cached?" for one open file. Thread-safe."""

    def __init__(self, libc: ctypes.CDLL, address: int, size: int) -> None:
        self._libc = libc
        self._address = address
        self._size = size

    def pages(self, start: int, end: int) -> bytes | None:
        """One byte per page, from the page holding ``start`` to the one holding ``end - 1``.

        A byte is 1 where the page is in the page cache, else 0; None if mincore failed.
        """
        first = start - start % PAGE
        last = min(end, self._size)
        count = -(-(last - first) // PAGE)
        if count <= 0:
            return b""
        vec = ctypes.create_string_buffer(count)
        if self._libc.mincore(self._address + first, last - first, vec) != 0:
            return None
        return vec.raw.translate(_RESIDENT_BIT)

    def close(self) -> None:
        if self._address:
            self._libc.munmap(self._address, self._size)
            self._address = 0


def open_residency(path: Path, fd: int) -> Residency | None:
    """A :class:`Residency` for the file open as ``fd``, or None where mincore cannot tell."""
    libc = _load_libc()
    if libc is None:
        return None
    st = os.fstat(fd)
    if st.st_size == 0 or not _may_ask(path, st):
        return None
    address = libc.mmap(None, st.st_size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    return Residency(libc, address, st.st_size)
