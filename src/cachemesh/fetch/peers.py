"""Who else may hold a blob, and who fetches it from its origin: the :class:`Peers` interface.

The fetcher asks peers before the origin (``swarm.py``). Two questions decide what it
does, and each is a method here, so that the answer's source can change:

``candidates(sha256)``
    The nodes that may hold the blob, or be fetching it. With a static list
    (:class:`StaticPeers`, ``CACHEMESH_PEERS``): every other node of the list; the
    fetcher asks each what it has (``GET/HEAD /api/v1/blobs/sha256/{hex}``). In cluster
    mode: the holders that ``P/blobs/{sha256}/`` names in etcd.
``origin_turn(sha256, seen, waited_s)``
    Whether this node may fetch pieces that no peer can give from the origin now: the
    cluster-wide single flight, so that nodes starting the same model at once cost the
    origin one copy. With a static list the rule is deterministic and needs no
    coordinator: **the lowest-named node among those fetching the blob fetches it from
    the origin**; the others take its pieces, and each other's, as they land. A node
    waits up to :data:`STATIC_GRACE_S` for lower-named live nodes that do not fetch the
    blob yet (they may be starting), then takes its turn. A node that dies drops out of
    ``seen`` (it no longer answers) and the next one takes over. In cluster mode this is
    an etcd claim (``etcd_peers.py``): ``P/fetching/{sha256}`` created if absent by the node
    that fetches, bound to the lease of its pull process, so that it goes with the pull.

What this node tells the others (no-ops with a static list, where every peer is asked
directly; writes of the blob index in cluster mode, ``etcd_peers.py``): ``started``,
``landed`` and ``finished`` of a fetch; ``record_origin`` after a file was fetched from
its origin and checked; ``resolve`` and ``piece_list`` read what others recorded.

``seen`` is what this node learnt from asking the candidates, one :data:`PeerState` per
peer name: ``verified`` (holds the blob), ``fetching`` (a process of that node fetches it
now), ``partial`` (landed pieces, nobody fetching), ``absent``, ``dead`` (no answer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..cluster.blob_index import OriginRecord
    from ..config import ClusterSettings
    from .pieces import PieceList

PeerState = Literal["verified", "fetching", "partial", "absent", "dead"]

# Seconds a node waits for lower-named live peers to start fetching a blob before it
# fetches the blob from the origin itself (static peers only; an etcd lease needs no wait).
STATIC_GRACE_S = 2.0


@dataclass(frozen=True)
class Peer:
    """Another node, reached at its advertise URL."""

    name: str
    url: str


class Peers(ABC):
    """Where the fetcher looks for a blob besides its origin (see the module docstring)."""

    me: str

    @abstractmethod
    def candidates(self, sha256: str) -> Sequence[Peer]:
        """The nodes that may hold, or be fetching, the blob."""

    @abstractmethod
    def origin_turn(self, sha256: str, seen: Mapping[str, PeerState], waited_s: float) -> bool:
        """Whether this node may fetch the blob's missing pieces from the origin now."""

    def seed(self, sha256: str, fetching: Iterable[str]) -> str | None:
        """The other node that fetches the blob from the origin, or None (this one, or
        nobody): by default the lowest-named of those ``fetching``, if below this one."""
        lowest = min(fetching, default=None)
        return lowest if lowest is not None and lowest < self.me else None

    def started(self, sha256: str, size: int) -> None:
        """A fetch of the blob starts on this node."""

    def landed(self, sha256: str, size: int, ranges: Sequence[tuple[int, int]]) -> None:
        """These ``[start, end)`` ranges of it are here (called at every checkpoint;
        throttle inside)."""

    def finished(self, sha256: str, size: int, *, ok: bool,
                 pieces: PieceList | None = None) -> None:
        """The fetch ended: the blob verified here (``ok``), or not."""

    def claimed(self, sha256: str) -> bool:
        """Whether this node took the origin's turn for the blob (its piece list is then
        worth publishing)."""
        return False

    def resolve(self, identity: str, size: int) -> OriginRecord | None:
        """What another node learnt of this origin file (its sha256), if anything."""
        return None

    def record_origin(self, identity: str, sha256: str, size: int,
                      checked: Sequence[str]) -> None:
        """This node fetched the file from its origin and checked ``checked`` against it."""

    def piece_list(self, sha256: str, size: int) -> PieceList | None:
        """The blob's piece hashes, if published where all can read them."""
        return None

    def close(self) -> None:
        """Release what the peers hold (connections, leases)."""


class StaticPeers(Peers):
    """A fixed list of nodes (``CACHEMESH_PEERS``); the lowest-named fetcher goes to the origin."""

    def __init__(self, me: str, peers: Sequence[Peer], grace_s: float = STATIC_GRACE_S) -> None:
        self.me = me
        self.peers = [p for p in peers if p.name != me]
        self.grace_s = grace_s

    @classmethod
    def from_settings(cls, cluster: ClusterSettings) -> StaticPeers:
        return cls(cluster.name_or_host(), [Peer(n, u) for n, u in cluster.peers])

    def candidates(self, sha256: str) -> Sequence[Peer]:
        return self.peers

    def origin_turn(self, sha256: str, seen: Mapping[str, PeerState], waited_s: float) -> bool:
        lower = [p.name for p in self.peers if p.name < self.me]
        if any(seen.get(name) == "fetching" for name in lower):
            return False  # a lower-named node fetches it: follow it
        if waited_s >= self.grace_s:
            return True
        # Lower-named nodes that answer but do not fetch it (yet) may be starting.
        return all(seen.get(name) == "dead" for name in lower)
