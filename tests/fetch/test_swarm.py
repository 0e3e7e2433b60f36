"""The peer-first transfer (fetch/swarm.py) against peers in memory: which bytes come from
where, and what a bad, slow or dead peer costs. The wire and real processes are tested in
tests/serve/test_blobs.py and tests/netns/."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator

import pytest

import cachemesh.fetch.swarm as swarm
from cachemesh.errors import SourceNotFoundError, TransientSourceError
from cachemesh.fetch import Fetcher
from cachemesh.fetch.ledger import PeerLedger
from cachemesh.fetch.peer_http import Availability
from cachemesh.fetch.peers import Peer, StaticPeers
from cachemesh.fetch.pieces import PieceList, piece_ranges
from cachemesh.fetch.reads import TooSlow
from tests.fetch.conftest import KIB, FakeObject

PIECE = 64 * KIB


class FakePeer:
    """One peer's copy of one blob: all of it (verified) or some ranges, and its faults."""

    def __init__(self, name: str, data: bytes, *, ranges: list[tuple[int, int]] | None = None,
                 state: str = "verified", flip: bool = False) -> None:
        self.peer = Peer(name, f"http://{name}.invalid:8008")
        self.data = data
        self.ranges = [(0, len(data))] if ranges is None else ranges
        self.state = state
        self.flip = flip
        self.dead = False
        self.slow = False
        self.served = 0
        self.reads: list[tuple[int, int]] = []


class FakeClient:
    """The PeerClient's three calls, answered from FakePeers."""

    def __init__(self, *peers: FakePeer) -> None:
        self.peers = {p.peer.name: p for p in peers}
        self.lock = threading.Lock()

    def probe(self, peer: Peer, sha256: str) -> Availability:
        p = self.peers[peer.name]
        if p.dead:
            return Availability("dead")
        if p.state == "absent":
            return Availability("absent")
        return Availability(p.state, len(p.data), tuple(p.ranges))  # type: ignore[arg-type]

    def watch(self, peer: Peer, sha256: str) -> Iterator[Availability]:
        """As a node's watch stream: what it has, each time that changes."""
        last = None
        for _ in range(1000):
            now = self.probe(peer, sha256)
            if now.state == "dead":
                raise TransientSourceError(f"{peer.name}: connection refused")
            if now != last:
                last = now
                yield now
                if now.state == "verified":
                    return
            time.sleep(0.005)

    def read(self, peer: Peer, sha256: str, start: int, end: int,
             stop: threading.Event) -> bytearray:
        p = self.peers[peer.name]
        with self.lock:
            p.reads.append((start, end))
        if p.dead:
            raise TransientSourceError(f"{peer.name}: connection refused")
        if p.slow:
            raise TooSlow(f"{peer.name}: under the low-speed limit")
        if not any(s <= start and end <= e for s, e in p.ranges):
            raise SourceNotFoundError(f"{peer.name}: not landed")
        data = bytearray(p.data[start:end])
        if p.flip:
            data[0] ^= 0xFF
        with self.lock:
            p.served += len(data)
        return data

    def pieces(self, peer: Peer, sha256: str, size: int) -> PieceList | None:
        p = self.peers[peer.name]
        if p.state != "verified" or p.dead:
            return None
        digests = tuple(hashlib.sha256(p.data[s:e]).hexdigest()
                        for s, e in piece_ranges(len(p.data), PIECE))
        return PieceList(hashlib.sha256(p.data).hexdigest(), len(p.data), PIECE, digests)


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarm, "PIECE_SIZE", PIECE)
    monkeypatch.setattr(swarm, "POLL_S", 0.02)


def fetcher_for(store, settings, me: str, *peers: FakePeer, grace_s: float = 0.3) -> Fetcher:
    static = StaticPeers(me, [p.peer for p in peers], grace_s=grace_s)
    return Fetcher(store, settings, peers=static, peer_client=FakeClient(*peers))


def test_every_piece_comes_from_peers_and_is_spread_over_them(store, fetch_settings):
    data = os.urandom(20 * PIECE + 123)
    obj = FakeObject(data)
    a, b = FakePeer("a", data), FakePeer("b", data)
    ref = fetcher_for(store, fetch_settings, "c", a, b).fetch(obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert obj.served == 0  # the origin was not asked
    assert a.served + b.served == len(data)
    assert a.served > 0 and b.served > 0
    counts = PeerLedger(store.home).read()
    assert counts["fetched_bytes"] == {"a": a.served, "b": b.served}


def test_a_bad_piece_is_refetched_elsewhere_and_its_peer_dropped(store, fetch_settings):
    data = os.urandom(12 * PIECE)
    obj = FakeObject(data)
    bad, good = FakePeer("a", data, flip=True), FakePeer("b", data)
    ref = fetcher_for(store, fetch_settings, "c", bad, good).fetch(
        obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert len(bad.reads) <= swarm.PER_PEER_INFLIGHT  # dropped at its first bad piece
    assert good.served == len(data) and obj.served == 0
    faults = PeerLedger(store.home).read()["faults"]
    assert list(faults) == ["a"] and 1 <= faults["a"]["bad-piece"] <= swarm.PER_PEER_INFLIGHT


def test_bad_pieces_found_only_by_the_blob_hash_are_repaired(store, fetch_settings):
    """While the blob is fetched no peer holds it verified, so no piece list is known: the
    sha256 fails at the end, the list is fetched then, and the bad pieces alone again."""
    data = os.urandom(8 * PIECE)
    obj = FakeObject(data)
    liar = FakePeer("a", data, state="fetching", flip=True)  # flips the first byte it sends
    late = FakePeer("c", data, ranges=[], state="absent")
    client = FakeClient(liar, late)
    real_read = FakeClient.read

    def read(peer, sha256, start, end, stop):
        got = real_read(client, peer, sha256, start, end, stop)
        if peer.name == "a" and liar.served == len(data):
            late.state, late.ranges = "verified", [(0, len(data))]  # a holder shows up
        return got

    client.read = read  # type: ignore[method-assign]
    static = StaticPeers("b", [liar.peer, late.peer])
    ref = Fetcher(store, fetch_settings, peers=static, peer_client=client).fetch(
        obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert obj.served == 0
    assert late.served == len(data)  # every piece of the liar's was bad: all fetched again
    assert PeerLedger(store.home).read()["faults"] == {"a": {"bad-blob": 8}}


def test_the_origin_gives_only_what_no_peer_has(store, fetch_settings):
    data = os.urandom(10 * PIECE)
    obj = FakeObject(data)
    a = FakePeer("a", data, ranges=[(0, 6 * PIECE)], state="partial")  # stopped half way
    ref = fetcher_for(store, fetch_settings, "b", a, grace_s=0.0).fetch(
        obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert a.served == 6 * PIECE
    assert obj.served == 4 * PIECE


def test_a_follower_waits_for_the_lower_named_fetcher_instead_of_the_origin(
        store, fetch_settings):
    data = os.urandom(6 * PIECE)
    obj = FakeObject(data)
    a = FakePeer("a", data, ranges=[], state="fetching")

    def land() -> None:  # "a" fetches from the origin meanwhile, a piece at a time
        for s, e in piece_ranges(len(data), PIECE):
            time.sleep(0.05)
            a.ranges = [(0, e)]

    threading.Thread(target=land, daemon=True).start()
    ref = fetcher_for(store, fetch_settings, "b", a).fetch(obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert obj.served == 0 and a.served == len(data)


def test_a_dead_or_slow_peer_is_dropped_and_the_rest_finishes(store, fetch_settings):
    """a dies after two pieces, b turns slow after one; c gets the blob only once both
    failed, so both are asked until they fail whatever order the pieces are asked in."""
    data = os.urandom(16 * PIECE)
    obj = FakeObject(data)
    dead, slow = FakePeer("a", data), FakePeer("b", data)
    good = FakePeer("c", data, ranges=[], state="absent")
    real_read = FakeClient.read
    client = FakeClient(dead, slow, good)

    def read(peer, sha256, start, end, stop):
        if peer.name == "a" and dead.served >= 2 * PIECE:
            dead.dead = True  # killed mid-transfer
        if peer.name == "b" and slow.served >= PIECE:
            slow.slow = True
        if dead.dead and slow.slow:
            good.state, good.ranges = "verified", [(0, len(data))]
        return real_read(client, peer, sha256, start, end, stop)

    client.read = read  # type: ignore[method-assign]
    static = StaticPeers("d", [dead.peer, slow.peer, good.peer])
    ref = Fetcher(store, fetch_settings, peers=static, peer_client=client).fetch(
        obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert obj.served == 0
    assert good.served > 0
    faults = PeerLedger(store.home).read()["faults"]
    assert {p: set(kinds) for p, kinds in faults.items()} == {
        "a": {"unreachable"}, "b": {"slow"}}, faults


def test_without_a_published_sha256_the_origin_is_used(store, fetch_settings):
    data = os.urandom(4 * PIECE)
    obj = FakeObject(data)
    a = FakePeer("a", data)
    fetcher_for(store, fetch_settings, "b", a).fetch(obj.request())
    assert a.reads == [] and obj.served == len(data)


def test_a_stale_answer_does_not_send_the_follower_to_the_origin(store, fetch_settings):
    """The seed says "absent" for a moment as its fetch commits (its last watch line),
    and the follower's turn comes at once: the peers are asked again first, and the
    pieces come from the seed, which holds the blob whole by then."""
    data = os.urandom(8 * PIECE)
    obj = FakeObject(data)
    a = FakePeer("a", data, ranges=[(0, 2 * PIECE)], state="fetching")
    client = FakeClient(a)
    watched = [0]

    def watch(peer, sha256):
        watched[0] += 1
        if watched[0] == 1:
            yield Availability("fetching", len(data), ((0, 2 * PIECE),))
            time.sleep(0.1)
            a.state, a.ranges = "verified", [(0, len(data))]  # the commit...
            yield Availability("absent")  # ...seen mid-way by the watch
            return
        time.sleep(1.0)  # the next watch line comes late
        yield client.probe(peer, sha256)

    client.watch = watch  # type: ignore[method-assign]
    static = StaticPeers("b", [a.peer], grace_s=0.0)
    ref = Fetcher(store, fetch_settings, peers=static, peer_client=client).fetch(
        obj.request(sha256=obj.sha256))
    assert store.blobs.path(ref.sha256).read_bytes() == data
    assert obj.served == 0 and a.served == len(data)
