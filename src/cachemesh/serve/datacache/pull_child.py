"""The child process that pulls one data cache for the server
(``python -m cachemesh.serve.datacache.pull_child``; ``datacache_service.Puller`` starts it).

It reads the server's settings and the cache's name, pickled, on its stdin, pulls
the cache, and writes progress and events to the store, where the API reads them.
Exit status: 0 pulled; :data:`PULL_FAILED` the pull failed and the store recorded
it (status Failed, the error and an event); anything else is a crash (its traceback
on stderr), which the store reads as an interrupted pull.
"""

from __future__ import annotations

import pickle
import sys

PULL_FAILED = 3


def main() -> int:
    from ...caches import Caches
    from ...errors import CachemeshError

    settings, name = pickle.load(sys.stdin.buffer)
    try:
        Caches(settings).pull(name)
    except CachemeshError:
        return PULL_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
