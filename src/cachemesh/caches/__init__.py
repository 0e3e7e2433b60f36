"""The DataCache lifecycle: declare, pull, report, use, evict, remove.

    spec.py      what a cache is: CacheSpec, statuses, CacheInfo, Progress, results
    catalog.py   CacheCatalog: the rows in meta.db (every SQL statement of the package)
    guard.py     what a local source may be (the store's own files, source roots)
    pull.py      pulling a declared cache; cachemesh.pull()
    evict.py     removal, gc, making room for a pull, recovery after a crash
    hub_sync.py  the hub/ view (Hugging Face cache layout) kept in line with the caches
    facade.py    Caches: the one object callers hold

The names below are what the rest of cachemesh imports from here.
"""

from __future__ import annotations

from .facade import Caches

# Binds the function over the submodule of the same name: ``cachemesh.caches.pull``
# is cachemesh.pull(), as it was before the package; import the module's other
# names with ``from cachemesh.caches.pull import ...``.
from .pull import check_listing, pull, select_files
from .spec import (
                   AVAILABLE,
                   DELETING,
                   FAILED,
                   LOADING,
                   MAX_RETENTION_DAYS,
                   MAX_SIZE_LIMIT_GIB,
                   PENDING,
                   CacheInfo,
                   CacheSpec,
                   Event,
                   GcReport,
                   Progress,
                   PullResult,
                   make_spec,
)

__all__ = [
    "AVAILABLE", "DELETING", "FAILED", "LOADING", "MAX_RETENTION_DAYS", "MAX_SIZE_LIMIT_GIB",
    "PENDING", "CacheInfo", "CacheSpec", "Caches", "Event", "GcReport", "Progress",
    "PullResult", "check_listing", "make_spec", "pull", "select_files",
]
