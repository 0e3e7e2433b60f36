"""The downloader shared by every remote source.

Parallel ranged reads (within a file and across files), retries with backoff,
resume after a cut connection or a crash, sha256 computed on the way in and
checked against the origin's checksum before a blob is visible, single-flight
across caches, threads and processes, exact progress, and a hook for loaders
that read an object while it lands.

A source does not use this module directly: it subclasses
:class:`cachemesh.sources.base.RemoteSource`, which turns each listed file into
a :class:`FetchRequest` for a :class:`Fetcher`. Modules:

    fetcher.py   Fetcher, FetchRequest: locking, single flight, attempts
    transfer.py  one attempt: resume, workers, checkpoints, verify, commit
    reads.py     the origin's read of one range: retries, low-speed limit
    slots.py     connection slots shared by the reads, writes joined from small reads
    progress.py  each byte of an object reported once
    ranges.py    RangeSet and the partial file + state record (on-disk format)
    landing.py   Landing: where objects land and which bytes have (the public reader)
    hashing.py   digests of bytes that land out of order
    retry.py     RetryPolicy: backoff with jitter
    observe.py   FetchObserver, Flight: watching an object while it lands
    http.py      httpx client, probe and ranged reads for HTTP(S) origins

Peers (other nodes) are asked before the origin for a blob whose sha256 is known:

    peers.py     Peers (who may hold a blob, who goes to the origin), StaticPeers
    etcd_peers.py EtcdPeers: the cluster's blob index in etcd (cluster mode)
    swarm.py     SwarmTransfer: pieces from several peers, the origin for the rest
    pieces.py    PieceList: a sha256 per fixed-size piece, checked as pieces land
    peer_http.py the peer protocol (routes, headers) and PeerClient
    ledger.py    what peers did for this store's fetches (for /metrics)
"""

from .fetcher import Fetcher, FetchRequest, RangeRead
from .landing import Landed, Landing, LandingSpot, content_identity, identity_key
from .observe import FetchObserver, Flight
from .peers import Peer, Peers, StaticPeers
from .ranges import PartialState, RangeSet
from .retry import RetryPolicy

__all__ = [
    "FetchObserver",
    "FetchRequest",
    "Fetcher",
    "Flight",
    "Landed",
    "Landing",
    "LandingSpot",
    "PartialState",
    "Peer",
    "Peers",
    "RangeRead",
    "RangeSet",
    "RetryPolicy",
    "StaticPeers",
    "content_identity",
    "identity_key",
]
