"""The small interface cluster mode needs from etcd, and nothing more.

:class:`KV` is what membership, election and (later) the model registry, copy
locations and the blob index are written against. Two implementations:

- :class:`~cachemesh.cluster.etcd.EtcdKV`: a real etcd v3 (3.4 or later), the only one
  a server uses;
- :class:`~cachemesh.cluster.memory.MemoryKV`: in memory, for unit tests of logic only.
  The contract tests (``tests/cluster/test_kv.py``) run against both, so the fake
  cannot drift from etcd unnoticed.

Semantics are etcd's: one revision counter for the whole store, bumped by every
write; each key has a ``create_revision`` and a ``mod_revision``; a lease is a TTL
that keys can be bound to and that is kept alive by its holder. Errors:

- :class:`~cachemesh.errors.ClusterUnavailableError`: etcd could not be reached, or has
  no leader. A write that raised it may or may not have happened: read before retrying.
- :class:`~cachemesh.errors.RevisionConflictError`: a compare-and-put found the key elsewhere.
- :class:`~cachemesh.errors.LeaseLostError`: the lease is gone (expired, revoked, or etcd
  lost its data); everything bound to it is gone too.
- :class:`~cachemesh.errors.HistoryLostError`: a watch cannot resume (compacted, or another
  etcd answers than before); read the prefix again and watch from there.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["KV", "Backoff", "KeyValue", "Snapshot", "WatchEvent", "prefix_end"]


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it. ``lease`` is 0 for a key bound to no lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The keys under a prefix at ``revision``; watch from ``revision + 1`` to follow it."""

    kvs: list[KeyValue]
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """A put or a delete. For a delete, ``kv.value`` is empty and ``kv.mod_revision``
    is the revision of the delete."""

    kind: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


class Backoff:
    """Delays between reconnection attempts: doubling from ``initial``, at most ``cap``,
    with jitter so that a hundred nodes do not reconnect in step.

    gRPC's own reconnect backoff grows to 120 s; a node must notice etcd's return
    within seconds (issue 17: resync within 10 s), hence the low cap.
    """

    def __init__(self, initial: float = 0.1, cap: float = 2.0) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self._next = self.initial


class KV(ABC):
    """A key-value store with revisions, compare-and-put, watches and leases (etcd's model).

    Keys are text; values are bytes. Every method may raise
    :class:`~cachemesh.errors.ClusterUnavailableError`.
    """

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key, or None when absent."""

    @abstractmethod
    async def get_prefix(self, prefix: str) -> Snapshot:
        """Every key that starts with ``prefix``, in key order, and the store's revision."""

    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write unconditionally; returns the revision of the write. Only for keys one
        writer owns (its own node record); shared state goes through :meth:`put_if`."""

    @abstractmethod
    async def put_if(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> int:
        """Write only if the key is at ``mod_revision`` (0: only if it is absent); returns
        the revision of the write, or raises :class:`~cachemesh.errors.RevisionConflictError`
        with the revision found. A lease that does not exist raises LeaseLostError."""

    @abstractmethod
    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        """Delete the key (only if at ``mod_revision``, when given); True if it was deleted.
        A key not at ``mod_revision`` raises RevisionConflictError; an absent key is False."""

    @abstractmethod
    def watch(self, key: str, *, prefix: bool = False,
              start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events on ``key`` (or every key under it, with ``prefix``) from ``start_revision``
        on, in revision order, for as long as the caller iterates.

        A broken connection is resumed where it stopped, with a bounded backoff; events are
        neither lost nor repeated. Raises HistoryLostError when that is impossible: history
        compacted, or etcd behind the revision already seen (replaced by an empty one). An
        empty etcd that already wrote past that revision cannot be told apart here: the
        membership's epoch check reports it (``Rejoin.data_lost``), and readers read again.
        Close the iterator (``contextlib.aclosing``) to cancel the watch.
        """

    @abstractmethod
    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""

    @abstractmethod
    async def keep_alive(self, lease: int) -> int:
        """Renew the lease once; returns its TTL. Raises LeaseLostError if it is gone."""

    @abstractmethod
    async def revoke_lease(self, lease: int) -> bool:
        """Revoke the lease, deleting its keys; False if it was already gone."""

    @abstractmethod
    async def lease_ttl(self, lease: int) -> int | None:
        """Seconds the lease has left, or None when it is gone."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; watches in progress end."""

    @property
    @abstractmethod
    def endpoints(self) -> str:
        """Where this store is, for messages (never with credentials)."""
