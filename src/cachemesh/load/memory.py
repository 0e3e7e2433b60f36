"""Host memory that tensors are read into.

One anonymous private mapping per file, advised for transparent huge pages.
Why not ``torch.empty``: its memory comes from malloc, which neither aligns a
large block to 2 MiB nor asks for huge pages, so every 4 KiB of a 2 GB load
costs a page fault. With ``MADV_HUGEPAGE`` the kernel backs the mapping with
2 MiB pages where it can, on first touch by the reading threads, spread over
the threads that do the copying. Measured on the 2-core benchmark machine
(THP in ``madvise`` mode), 2 GiB read from the page cache by two threads:

    4 KiB pages (plain mapping)      525,000 faults   0.47 s
    MADV_HUGEPAGE                      2,600 faults   0.13 s
    MAP_POPULATE, then the reads     525,000 faults   0.75-1.05 s (0.6-0.9 s in mmap alone)
    torch.empty, then the reads      564,000 faults   1.2 s

``MAP_POPULATE`` was rejected: it pre-faults the whole mapping in the calling
thread before any read starts.

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
