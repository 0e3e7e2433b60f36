"""What peers did for this store's fetches, counted across the processes that fetch.

Pulls run in their own processes (``cachemesh pull``, the server's pull children), and
the server's ``/metrics`` shows their peer counts (``serve/adapters/blobs.py``), so the counts
live in the store, in one small file that every fetch adds to under a lock::

    cluster/peer-counters.json   {"format": 1,
                                  "fetched_bytes": {"<peer>": 123456789, ...},
                                  "faults": {"<peer>": {"bad-piece": 1, "slow": 2, ...}}}

Fault kinds: ``bad-piece`` (a piece failed its hash as it landed), ``bad-blob`` (a piece
found bad only when the blob's sha256 failed), ``slow`` (dropped under the peers'
low-speed limit), ``unreachable`` (a connection failed or was cut). A transfer adds its
counts once, at its end; a process killed mid-transfer loses its counts, not the bytes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..store.locks import FileLock, private_dirs

FORMAT = 1
FAULT_KINDS = ("bad-piece", "bad-blob", "slow", "unreachable")


class PeerTally:
    """One transfer's counts, added to the ledger at its end."""

    def __init__(self) -> None:
        self.fetched: Counter[str] = Counter()
        self.faults: Counter[tuple[str, str]] = Counter()

    def __bool__(self) -> bool:
        return bool(self.fetched or self.faults)


class PeerLedger:
    """The counts of one store (see the module docstring)."""

    def __init__(self, home: Path) -> None:
        self.dir = Path(home) / "cluster"
        self.path = self.dir / "peer-counters.json"
        self._lock_path = self.dir / "peer-counters.lock"

    def read(self) -> dict[str, Any]:
        """``{"fetched_bytes": {peer: n}, "faults": {peer: {kind: n}}}``; empty if none yet."""
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("format") == FORMAT:
                return {"fetched_bytes": dict(raw.get("fetched_bytes", {})),
                        "faults": {p: dict(k) for p, k in raw.get("faults", {}).items()}}
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        return {"fetched_bytes": {}, "faults": {}}

    def add(self, tally: PeerTally) -> None:
        if not tally:
            return
        private_dirs(self.dir)
        with FileLock(self._lock_path):
            counts = self.read()
            for peer, n in tally.fetched.items():
                counts["fetched_bytes"][peer] = counts["fetched_bytes"].get(peer, 0) + n
            for (peer, kind), n in tally.faults.items():
                kinds = counts["faults"].setdefault(peer, {})
                kinds[kind] = kinds.get(kind, 0) + n
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, **counts}))
            os.replace(tmp, self.path)
