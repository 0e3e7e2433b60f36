"""The key space cachemesh keeps in etcd: every key, who writes it, how often, on which lease.

Everything lives under one versioned prefix ``P`` (``CACHEMESH_CLUSTER_PREFIX``, default
``/cachemesh/v1/``), so that a later schema can roll out beside this one. Values are JSON
(pydantic models in ``records.py``). A key bound to a node's lease disappears when the node
dies (its lease expires ``lease_ttl_s`` after its last keep-alive) or leaves (it revokes
the lease); a key without a lease is shared state that outlives every node.

::

    P
    ├── epoch                           random id of this etcd's data; no lease
    ├── nodes/{node}                    NodeRecord: one per live node; the node's lease
    ├── leader/{lease:016x}             election candidate, value = node name; the node's lease
    ├── models/{model}                  ModelDoc: versions, traffic, routes, scaling; no lease
    ├── buckets/{bucket}                a protected bucket's token hashes; no lease
    ├── copies/{model}/{version}/{node} where a copy lives, and its state; the node's lease
    ├── caches/{cache}                  a data cache declared cluster-wide (prewarm); no lease
    ├── prewarm/{cache}/{node}          one node's progress on a prewarm; the node's lease
    ├── blobs/{sha256}/{node}           a node holds this blob, or is fetching it; the node's lease
    ├── fetching/{sha256}               the one node fetching this blob from its origin; the
    │                                   lease of its pull process (fetch/etcd_peers.py)
    ├── pieces/{sha256}                 the blob's piece size and piece hashes; no lease
    └── origins/{sha256 of identity}    origin identity -> sha256, size, what was checked; no lease

Who writes, how often, and the write budget at 100 nodes (writes/second; etcd on an SSD
takes a few thousand). Keep-alives are not writes of the raft log, but they are listed:
they are the steady load of the leader.

====================  ===========================================================  ===========
key                   written by, when                                             w/s @ 100
====================  ===========================================================  ===========
lease keep-alive      every node, every ``lease_ttl_s / 3`` (3.3 s by default)     30 (no log)
epoch                 the first node that finds none (create-if-absent)            ~0
nodes/{node}          its node: on join, then at most once per                     20
                      ``RECORD_MIN_INTERVAL_S`` (5 s) while memory, copies or
                      rates changed
leader/{lease}        each node once per lease (at join, after a lease loss)       ~0 (100 at
                                                                                   a cold start)
models/{model}        any node, on a declaration; compare-and-put on the mod       <= 1
                      revision it read; an identical document is not written
buckets/{bucket}      any node, when a protected bucket or its tokens change       <= 0.1
copies/{m}/{v}/{node} the node holding the copy, on each state change              <= 30
                      (loading -> ready -> draining -> gone: 3 per load; at most
                      one load per 10 s per node on average)
caches/{cache}        any node, on a cluster-wide declaration                      <= 0.1
prewarm/{cache}/{n}   the node pulling it, at most once per 5 s while pulling      <= 20
blobs/{sha256}/{n}    the node, one transaction per pull at its start and one at   <= 100
                      its end (ranges landed: at most once per 2 s per blob in     (all 100
                      flight)                                                      pulling)
fetching/{sha256}     create-if-absent by the node that wins the origin fetch;     <= 2 per
                      deleted when the blob is verified                            blob
pieces/{sha256}       create-if-absent, once, by the node that verified the blob   ~0
                      against its origin
origins/{id}          create-if-absent, once, by a node that fetched the file from ~0
                      its origin and checked it against what the origin publishes
====================  ===========================================================  ===========

At 100 nodes the steady state is ~50 writes/s and 30 keep-alives/s; a cold start of the
whole fleet pulling at once peaks near 300 writes/s for the length of the pulls. Watches:
every node watches ``models/``, ``nodes/`` and ``copies/`` (a change is sent to 100 watchers,
so ~5,000 events/s out of etcd at the steady state, mostly node records: the first thing to
thin if etcd's CPU is the limit, by raising ``RECORD_MIN_INTERVAL_S``).

Rules every writer follows (STYLE 11): a write of shared state says which revision it
expects (:meth:`~cachemesh.cluster.kv.KV.put_if`, 0 = create-if-absent); readers learn of
changes from a watch that resumes at the revision it stopped at, never from a poll.
Names in keys are percent-encoded (a ``/`` cannot split a key); node, model, bucket and cache
names are already safe and read the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

# Least seconds between two writes of a node record (memory and rates change constantly).
RECORD_MIN_INTERVAL_S = 5.0


def part(value: str) -> str:
    """One component of a key: percent-encoded, so that it holds no '/'."""
    if not value:
        raise ValueError("an empty key component")
    return quote(value, safe="")


@dataclass(frozen=True)
class Keys:
    """Builds the keys of one cluster prefix (see the module docstring)."""

    prefix: str = "/cachemesh/v1/"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes/"

    def node(self, name: str) -> str:
        return f"{self.nodes}{part(name)}"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader/"

    def candidate(self, lease: int) -> str:
        return f"{self.leader}{lease:016x}"

    @property
    def models(self) -> str:
        return f"{self.prefix}models/"

    def model(self, name: str) -> str:
        return f"{self.models}{part(name)}"

    def bucket(self, name: str) -> str:
        return f"{self.prefix}buckets/{part(name)}"

    @property
    def copies(self) -> str:
        return f"{self.prefix}copies/"

    def copy(self, model: str, version: str, node: str) -> str:
        return f"{self.copies}{part(model)}/{part(version)}/{part(node)}"

    def cache(self, name: str) -> str:
        return f"{self.prefix}caches/{part(name)}"

    def prewarm(self, cache: str, node: str) -> str:
        return f"{self.prefix}prewarm/{part(cache)}/{part(node)}"

    def blob_holders(self, sha256: str) -> str:
        return f"{self.prefix}blobs/{_hex(sha256)}/"

    def blob_holder(self, sha256: str, node: str) -> str:
        return f"{self.blob_holders(sha256)}{part(node)}"

    def fetching(self, sha256: str) -> str:
        return f"{self.prefix}fetching/{_hex(sha256)}"

    def pieces(self, sha256: str) -> str:
        return f"{self.prefix}pieces/{_hex(sha256)}"

    def origin(self, identity_sha256: str) -> str:
        return f"{self.prefix}origins/{_hex(identity_sha256)}"

    def name_of(self, key: str, under: str) -> str:
        """The last component of ``key`` below ``under``, decoded: ``nodes/a`` -> ``a``."""
        if not key.startswith(under):
            raise ValueError(f"{key!r} is not under {under!r}")
        return unquote(key[len(under):])


def _hex(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a lowercase sha256 hex digest: {sha256!r}")
    return sha256
