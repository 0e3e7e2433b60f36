"""Cluster mode: many nodes coordinated through etcd (see docs/cluster.md).

``kv`` is the small interface to etcd and ``etcd`` its real implementation (``memory``:
the fake for unit tests); ``keys`` draws the key space; ``records`` holds the schemas of
the values.
"""

from __future__ import annotations

from .etcd import EtcdKV
from .keys import Keys
from .kv import KV, KeyValue, Snapshot, WatchEvent
from .records import Candidate, CopyState, DeviceMemory, NodeRecord

__all__ = [
    "KV",
    "Candidate",
    "CopyState",
    "DeviceMemory",
    "EtcdKV",
    "KeyValue",
    "Keys",
    "NodeRecord",
    "Snapshot",
    "WatchEvent",
]
