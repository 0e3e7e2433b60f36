"""Host memory that tensors are read into.

One anonymous private mapping per file, advised for transparent huge pages.
Why not ``torch.empty``: its memory comes from malloc, which neither aligns a
large block to 2 MiB nor asks for huge pages, so every 4 KiB of a 2 GB load
costs a page fault (about half a million of them). With ``MADV_HUGEPAGE`` the
kernel backs the mapping with 2 MiB pages where it can, on first touch by the
reading threads: a thousand faults instead, spread over the threads that do the
copying. ``MAP_POPULATE`` was measured as well and rejected: it pre-faults the
whole mapping in the calling thread before any read starts, which took longer
than the read itself (0.6-0.9 s for 2 GiB on the 2-core benchmark machine).

The mapping is released when the last tensor that views it is freed (each
tensor made with ``torch.frombuffer`` holds a buffer export of the mapping).
"""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE


def allocate(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned, writable anonymous mapping of ``nbytes`` (at least one page)."""
    size = max(PAGE, -(-nbytes // PAGE) * PAGE)
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, size, flags=flags)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and size >= 2 * 1024 * 1024:
        try:
            buf.madvise(advice)
        except OSError:
            pass  # THP disabled or unsupported: 4 KiB pages still work, only slower
    return buf
