"""Which caches to evict to make room: a pure, tested function.

Blobs are shared between caches, so evicting a cache frees only the blobs that
no surviving cache (and nothing the pull in progress reuses) still references.
Candidates are taken least recently used first; the plan stops as soon as
enough bytes are freed. No plan (None) means the room cannot be made, and
then nothing is evicted at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    last_access: float
    blobs: frozenset[str]


def plan_eviction(
    candidates: Iterable[Candidate],
    need: int,
    refs: Mapping[str, set[str]],
    sizes: Mapping[str, int],
    keep_blobs: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[str], int] | None:
    """Pick caches (LRU first) whose removal frees at least ``need`` bytes.

    ``refs`` maps each blob to the caches referencing it, ``sizes`` each blob
    to its size. Returns (caches, bytes freed), or None if even evicting every
    candidate is not enough.
    """
    if need <= 0:
        return [], 0
    evicted: set[str] = set()
    chosen: list[str] = []
    freed = 0
    freed_blobs: set[str] = set()
    for cand in sorted(candidates, key=lambda c: (c.last_access, c.name)):
        evicted.add(cand.name)
        chosen.append(cand.name)
        # Any blob of an evicted cache may become free once all its referrers are gone.
        for blob in cand.blobs:
            if blob in freed_blobs or blob in keep_blobs:
                continue
            if refs.get(blob, set()) <= evicted:
                freed_blobs.add(blob)
                freed += sizes.get(blob, 0)
        if freed >= need:
            return chosen, freed
    return None
