"""Data caches declared cluster-wide (preheat) and each node's progress on them.

The keys (``keys.py``)::

    P/caches/{cache}           CacheDecl       written by the node that took the declaration
                                               (any node, through the control API), create-
                                               if-absent; the same declaration again is a
                                               no-op (idempotent), another one a conflict.
                                               No lease: it outlives every node.
    P/prewarm/{cache}/{node}   PrewarmRecord   written by that node as it pulls the cache:
                                               on each state change, and its progress at most
                                               every PREWARM_INTERVAL_S. On the node's lease:
                                               a node that leaves takes its entries with it,
                                               so "Available" entries count the live copies
                                               (what min_copies keeps; caches/evict.py).

Which nodes pull a declaration (``nodes``):

- ``"all"``: every node, and every node that joins later (it reads the declarations as
  it starts);
- a list of names: those nodes;
- ``N``: N nodes picked once, when the declaration is taken (:func:`pick_nodes`): the
  most free disk first, spread across zones (``zone`` label) before a zone gets a second
  one. The picked names are written into the declaration (``assigned``), so every node
  reads the same answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from ..store.names import check_name
from .records import NodeRecord, _Record

# Least seconds between two progress writes of one node's prewarm entry (keys.py's write
# budget); a change of state is written at once.
PREWARM_INTERVAL_S = 5.0
# How often a node looks at its own pull of a prewarm (its store, not etcd).
PREWARM_LOOK_S = 0.5

NodesSpec = Literal["all"] | int | list[str]


def parse_nodes(value: Any) -> NodesSpec:
    """``all``, a positive count, or node names (a list, or ``a,b`` as text): checked."""
    from ..config import parse_node_name
    from ..errors import InvalidInputError

    if isinstance(value, bool):
        raise InvalidInputError(f"nodes must be 'all', a count or node names, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise InvalidInputError(f"nodes must be at least 1, got {value}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return "all"
        if text.isdigit():
            return parse_nodes(int(text))
        value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return sorted({parse_node_name(v) for v in value})
    raise InvalidInputError(f"nodes must be 'all', a count or node names, got {value!r}")


class CacheDecl(_Record):
    """``caches/{cache}``: a data cache declared cluster-wide."""

    name: str
    spec: dict[str, Any] = Field(description="the CacheSpec, as the API took it")
    nodes: NodesSpec = "all"
    assigned: list[str] | None = Field(default=None, description="the N nodes picked")
    min_copies: int | None = Field(default=None, ge=1)
    declared_by: str = ""
    declared_at: float = 0.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "cache name")

    def selects(self, node: str) -> bool:
        if self.nodes == "all":
            return True
        if isinstance(self.nodes, list):
            return node in self.nodes
        return node in (self.assigned or [])

    def same_as(self, other: CacheDecl) -> bool:
        """The same declaration (whoever made it, whenever)."""
        return (self.spec, self.nodes, self.min_copies) == (other.spec, other.nodes,
                                                           other.min_copies)

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheDecl:
        return cls.model_validate_json(data)


class PrewarmRecord(_Record):
    """``prewarm/{cache}/{node}``: one node's pull of a cluster-wide cache."""

    node: str
    state: Literal["Pending", "Loading", "Available", "Failed"]
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    bytes_done: int = Field(default=0, ge=0)
    bytes_total: int = Field(default=0, ge=0)
    error: str | None = None
    updated_at: float = 0.0

    @classmethod
    def from_bytes(cls, data: bytes) -> PrewarmRecord:
        return cls.model_validate_json(data)


def pick_nodes(nodes: Sequence[NodeRecord], n: int, free: dict[str, int]) -> list[str]:
    """``n`` node names: round-robin over zones (the zone with the most free disk first),
    within a zone the most free disk first; ties by name. Fewer if fewer nodes live."""
    zones: dict[str, list[NodeRecord]] = defaultdict(list)
    for node in nodes:
        if not node.draining:
            zones[node.labels.get("zone", "")].append(node)
    for members in zones.values():
        members.sort(key=lambda r: (-free.get(r.name, 0), r.name))
    order = sorted(zones, key=lambda z: (-free.get(zones[z][0].name, 0), z))
    picked: list[str] = []
    while len(picked) < n and any(zones[z] for z in order):
        for zone in order:
            if zones[zone] and len(picked) < n:
                picked.append(zones[zone].pop(0).name)
    return sorted(picked)
