"""Cluster mode: many nodes coordinated through etcd (see docs/cluster.md).

``kv`` is the small interface to etcd and ``etcd`` its real implementation (``memory``:
the fake for unit tests); ``keys`` draws the key space; ``records`` holds the schemas of
the values; ``membership`` keeps a node's lease-bound record; ``election`` picks a leader.
``blob_index`` is who holds which blob, the single flight's claims, origin mappings and
piece lists (peer-to-peer); ``cache_decls`` the data caches declared cluster-wide.
"""

from __future__ import annotations

from .election import Election
from .etcd import EtcdKV
from .keys import Keys
from .kv import KV, KeyValue, Snapshot, WatchEvent
from .membership import Membership, MembershipStatus, Rejoin, State
from .records import Candidate, CopyState, DeviceMemory, NodeRecord

__all__ = [
    "KV",
    "Candidate",
    "CopyState",
    "DeviceMemory",
    "Election",
    "EtcdKV",
    "KeyValue",
    "Keys",
    "Membership",
    "MembershipStatus",
    "NodeRecord",
    "Rejoin",
    "Snapshot",
    "State",
    "WatchEvent",
]
