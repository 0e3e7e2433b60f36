"""Which node of the cluster answers a request, and which loads a copy (pure).

Two decisions, over the node records (``cluster/records.py``) and nothing else:

- :func:`pick_copy`: of the nodes holding a ready copy, the one this node has fewest
  forwarded requests in flight to (the one picked longest ago on a tie): requests
  spread by load, not by turn, so a slow node takes fewer.
- :func:`rank_for_load`: where a copy that is loaded nowhere (or one more copy) goes,
  best first. The order is the one of ``placement.py`` for workers, raised to nodes:
  not draining and able to load it (``excluded`` lists the others: draining, refused,
  already tried); then a node that already has the version's files on disk (its record's
  ``prepared``, or ``has_files``: in cluster mode a node pulls a version only when it is
  to load it, so most nodes have not); then the most
  free memory (capacity less what it holds), counted in ``grain`` steps (the model's
  predicted size: two nodes whose free memory differs by less than one copy are as
  good, rather than ranked by the noise of their RSS); then the least recently used
  (the node whose newest request is oldest); then this node (no hop); then the name,
  so every node that ranks the same records gets the same order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from ...cluster.records import NodeRecord


@dataclass(frozen=True)
class Candidate:
    """A node that may load a copy, and why it ranks where it does."""

    name: str
    has_files: bool
    free_bytes: int
    last_used: float


def candidates(records: Iterable[NodeRecord], *, model: str | None = None,
               version: str | None = None, excluded: Collection[str] = (),
               has_files: Collection[str] = ()) -> list[Candidate]:
    """The nodes that may load a copy: live records, not draining, not ``excluded``, and
    not saying they cannot load ``model`` (``cannot_load``: a local source they lack).
    A node has the files when its record says it prepared ``model@version`` or it is in
    ``has_files``."""
    out = []
    for r in records:
        if r.draining or r.name in excluded or (model and model in r.cannot_load):
            continue
        free = max(0, (r.capacity_bytes or 0) - r.memory_used_bytes)
        newest = max((c.last_used for c in r.copies), default=0.0)
        files = r.name in has_files or (model is not None and r.has_files(model, version))
        out.append(Candidate(r.name, files, free, newest))
    return out


def rank_for_load(records: Iterable[NodeRecord], here: str, *, model: str | None = None,
                  version: str | None = None, excluded: Collection[str] = (),
                  has_files: Collection[str] = (), grain: int = 64 << 20) -> list[str]:
    """Node names best first (see the module docstring); empty if none may load it."""
    found = candidates(records, model=model, version=version, excluded=excluded,
                       has_files=has_files)
    step = max(1, grain)
    found.sort(key=lambda c: (not c.has_files, -(c.free_bytes // step), c.last_used,
                              c.name != here, c.name))
    return [c.name for c in found]


def pick_copy(ready: Iterable[str], inflight: Mapping[str, int],
              picked: Mapping[str, int]) -> str | None:
    """Of the nodes with a ready copy, the one with fewest forwarded requests in flight
    from here; on a tie the one picked longest ago (``picked``: a tick per pick)."""
    best = None
    for name in ready:
        key = (inflight.get(name, 0), picked.get(name, 0), name)
        if best is None or key < best[0]:
            best = (key, name)
    return None if best is None else best[1]
