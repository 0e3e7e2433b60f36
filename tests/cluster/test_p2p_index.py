"""The blob index (cluster/blob_index.py) and EtcdPeers (fetch/etcd_peers.py) against a real
etcd: holders on a node's lease, the single flight claim and its hand-over when a lease
ends, origin mappings (first writer wins), piece lists."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from cachemesh.cluster import EtcdKV, Keys, NodeRecord
from cachemesh.cluster.blob_index import BlobIndex, HolderRecord, OriginRecord, PieceRecord
from cachemesh.fetch.etcd_peers import EtcdPeers
from cachemesh.fetch.peers import Peer
from cachemesh.fetch.pieces import PieceList
from tests.cluster.etcd_server import EtcdServer

SHA = hashlib.sha256(b"blob").hexdigest()


def kv_of(etcd: EtcdServer) -> EtcdKV:
    return EtcdKV([etcd.endpoint], timeout=2.0)


def once(etcd: EtcdServer, fn):  # type: ignore[no-untyped-def]
    """``await fn(kv)`` on a client of its own (a client belongs to one event loop)."""
    async def run():  # type: ignore[no-untyped-def]
        kv = kv_of(etcd)
        try:
            return await fn(kv)
        finally:
            await kv.close()
    return asyncio.run(run())


def holders(etcd: EtcdServer, keys: Keys) -> list[HolderRecord]:
    return once(etcd, lambda kv: BlobIndex(kv, keys).holders(SHA))


def test_holders_hang_on_the_node_lease(etcd: EtcdServer, cluster_keys: Keys) -> None:
    async def scenario() -> None:
        kv = kv_of(etcd)
        index = BlobIndex(kv, cluster_keys)
        lease_a, lease_b = await kv.grant_lease(5), await kv.grant_lease(5)
        await index.announce(SHA, HolderRecord(node="a", url="http://a:1", state="held",
                                               size=4), lease_a)
        await index.announce(SHA, HolderRecord(node="b", url="http://b:1", state="fetching",
                                               size=4, landed=2), lease_b)
        found = {h.node: h for h in await index.holders(SHA)}
        assert set(found) == {"a", "b"}
        assert (found["b"].state, found["b"].landed, found["b"].url) == ("fetching", 2,
                                                                        "http://b:1")
        assert await index.holder_counts([SHA]) == {SHA: {"a"}}
        with pytest.raises(ValueError):
            await index.announce(SHA, found["a"], 0)  # never outside a lease
        await kv.revoke_lease(lease_a)  # node a leaves: its entries go with it
        assert [h.node for h in await index.holders(SHA)] == ["b"]
        assert await index.withdraw(SHA, "b")
        assert await index.holders(SHA) == []
        await kv.close()

    asyncio.run(scenario())


def test_one_claim_per_blob_and_it_moves_when_its_lease_ends(etcd: EtcdServer,
                                                            cluster_keys: Keys) -> None:
    async def scenario() -> None:
        kv = kv_of(etcd)
        index = BlobIndex(kv, cluster_keys)
        lease_a, lease_b = await kv.grant_lease(5), await kv.grant_lease(5)
        results = await asyncio.gather(*(index.claim(SHA, n, lease)
                                         for n, lease in (("a", lease_a), ("b", lease_b))))
        assert results[0] == results[1] and results[0] in ("a", "b")
        winner = results[0]
        loser, loser_lease = ("b", lease_b) if winner == "a" else ("a", lease_a)
        assert await index.claim(SHA, winner, lease_a if winner == "a" else lease_b) == winner
        assert not await index.release(SHA, loser)  # not its claim
        await kv.revoke_lease(lease_a if winner == "a" else lease_b)  # the winner dies
        assert await index.claimant(SHA) is None
        assert await index.claim(SHA, loser, loser_lease) == loser
        assert await index.release(SHA, loser)
        assert await index.claimant(SHA) is None
        await kv.close()

    asyncio.run(scenario())


def test_origin_mapping_first_writer_wins_and_pieces(etcd: EtcdServer,
                                                     cluster_keys: Keys) -> None:
    async def scenario() -> None:
        kv = kv_of(etcd)
        index = BlobIndex(kv, cluster_keys)
        identity = "s3|http://minio:9000|bucket|key|etag-1"
        assert await index.origin(identity) is None
        first = OriginRecord(sha256=SHA, size=4, checked=("md5",), node="a")
        assert await index.record_origin(identity, first)
        other = OriginRecord(sha256="0" * 64, size=4, checked=("size",), node="b")
        assert not await index.record_origin(identity, other)
        found = await index.origin(identity)
        assert found is not None and (found.sha256, found.node, found.size_only) == (
            SHA, "a", False)
        # The identity never appears in a key (it may name a private endpoint).
        keys = [k.key for k in (await kv.get_prefix(cluster_keys.prefix)).kvs]
        assert not any("minio" in k for k in keys)
        with pytest.raises(ValueError):
            await index.record_origin(identity, OriginRecord(sha256=SHA, size=4, checked=(),
                                                             node="a"))
        record = PieceRecord(size=4, piece_size=4, digests=(SHA,), node="a")
        assert await index.record_pieces(SHA, record)
        assert not await index.record_pieces(SHA, record)
        assert await index.pieces(SHA) == record
        await kv.close()

    asyncio.run(scenario())


async def _join(kv: EtcdKV, keys: Keys, name: str) -> int:
    """A node record on a lease, as a server's membership writes it."""
    lease = await kv.grant_lease(5)
    record = NodeRecord(name=name, node_id=f"id-{name}", advertise=f"http://{name}.test:8008")
    await kv.put(keys.node(name), record.to_bytes(), lease=lease)
    return lease


def test_etcd_peers_find_each_other_and_hand_over_the_origin(etcd: EtcdServer,
                                                             cluster_keys: Keys) -> None:
    leases = {n: once(etcd, lambda kv, n=n: _join(kv, cluster_keys, n)) for n in ("a", "b")}

    def peers(name: str) -> EtcdPeers:
        return EtcdPeers(name, cluster_keys, lambda: kv_of(etcd), lease_ttl_s=2)

    a, b = peers("a"), peers("b")
    try:
        a.started(SHA, 100)
        deadline = time.monotonic() + 5
        while not b.candidates(SHA):
            assert time.monotonic() < deadline, "b never saw a fetching the blob"
            time.sleep(0.1)
        assert list(b.candidates(SHA)) == [Peer("a", "http://a.test:8008")]
        assert a.candidates(SHA) == []  # never itself
        assert a.origin_turn(SHA, {}, 0.0)  # a claims the origin fetch
        assert not b.origin_turn(SHA, {"a": "fetching"}, 10.0)  # however long b waited
        assert b.seed(SHA, ["a"]) == "a" and a.seed(SHA, ["b"]) is None
        pieces = PieceList(SHA, 4, 4, (SHA,))
        a.finished(SHA, 4, ok=True, pieces=pieces)
        assert b.piece_list(SHA, 4) == pieces
        held = holders(etcd, cluster_keys)
        assert [(h.node, h.state) for h in held] == [("a", "held")]

        # A pull that dies: its claim goes with its process's lease, and b takes over.
        other = hashlib.sha256(b"other").hexdigest()
        assert a.origin_turn(other, {}, 0.0)
        a.close()
        time.sleep(0.4)  # b's cached answer ages
        assert b.origin_turn(other, {}, 0.0)
        # The node's record is unchanged: a's holder entry stays on a's server's lease.
        assert [h.node for h in holders(etcd, cluster_keys)] == ["a"]
    finally:
        a.close()
        b.close()
        for lease in leases.values():
            once(etcd, lambda kv, lease=lease: kv.revoke_lease(lease))


def test_a_pull_without_a_server_offers_nothing(etcd: EtcdServer, cluster_keys: Keys) -> None:
    lone = EtcdPeers("lone", cluster_keys, lambda: kv_of(etcd), lease_ttl_s=2)
    try:
        lone.started(SHA, 10)
        lone.finished(SHA, 10, ok=True)
        assert holders(etcd, cluster_keys) == []
        assert lone.origin_turn(SHA, {}, 0.0)  # it still takes part in the single flight
    finally:
        lone.close()


def test_etcd_down_degrades_to_the_origin(tmp_path, cluster_keys: Keys) -> None:
    gone = EtcdPeers("x", cluster_keys, lambda: EtcdKV(["127.0.0.1:9"], timeout=0.5),
                     lease_ttl_s=2)
    try:
        assert gone.candidates(SHA) == []
        assert not gone.origin_turn(SHA, {}, 60.0)  # one failure: not yet
        time.sleep(2.1)
        assert gone.origin_turn(SHA, {}, 0.0)  # failing for the grace: the origin
        assert gone.resolve("id", 1) is None
    finally:
        gone.close()


# -- the origin mapping through the fetcher ----------------------------------------------


def _fetch_setup(tmp_path, name: str):  # type: ignore[no-untyped-def]
    from cachemesh.config import Settings
    from cachemesh.store import Store

    settings = Settings.from_env({"CACHEMESH_HOME": str(tmp_path / name)}, retry_backoff_s=0.01,
                                 range_concurrency=4, chunk_size=64 * 1024)
    return Store(settings.home), settings


def test_an_s3_like_file_is_mapped_once_and_found_by_the_next_node(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path) -> None:
    """No sha256 from the origin (an ETag = md5): the node that fetched it writes the mapping
    (checked: md5); the next node resolves it, fetches peer-first (it takes the claim, and
    publishes the piece list), and a wrong mapping costs a second attempt, not bad bytes."""
    import os

    from cachemesh.fetch import Fetcher
    from tests.fetch.conftest import FakeObject

    data = os.urandom(300 * 1024)
    obj = FakeObject(data)
    md5 = hashlib.md5(data).hexdigest()
    identity = "s3|http://minio.test:9000|bucket|weights.bin|" + md5
    sha = hashlib.sha256(data).hexdigest()
    a = EtcdPeers("a", cluster_keys, lambda: kv_of(etcd), lease_ttl_s=2)
    b = EtcdPeers("b", cluster_keys, lambda: kv_of(etcd), lease_ttl_s=2)
    c = EtcdPeers("c", cluster_keys, lambda: kv_of(etcd), lease_ttl_s=2)
    try:
        store_a, settings = _fetch_setup(tmp_path, "a")
        ref = Fetcher(store_a, settings, peers=a).fetch(obj.request(identity, md5=md5))
        assert ref.sha256 == sha
        found = b.resolve(identity, len(data))
        assert found is not None and (found.sha256, found.checked, found.node) == (
            sha, ("md5",), "a")
        assert b.resolve(identity, len(data) + 1) is None  # another size: not this file

        store_b, settings_b = _fetch_setup(tmp_path, "b")
        ref = Fetcher(store_b, settings_b, peers=b).fetch(obj.request(identity, md5=md5))
        assert ref.sha256 == sha
        assert b.piece_list(sha, len(data)) is not None  # b took the turn: a swarm ran

        # A mapping that lies (first writer wins, so write it under a fresh identity).
        liar = identity + "-2"
        c.record_origin(liar, "0" * 64, len(data), ["md5"])
        store_c, settings_c = _fetch_setup(tmp_path, "c")
        served = obj.served
        ref = Fetcher(store_c, settings_c, peers=c).fetch(obj.request(liar, md5=md5))
        assert ref.sha256 == sha and store_c.blobs.path(sha).read_bytes() == data
        assert obj.served - served == 2 * len(data)  # fetched twice: the lie cost time
        # A size-only origin: recorded as such, and only from a fetch wholly from it.
        plain = "https://files.test/x.bin|no-etag"
        Fetcher(store_c, settings_c, peers=c).fetch(FakeObject(data).request(plain))
        assert c.resolve(plain, len(data)).checked == ("size",)
    finally:
        for p in (a, b, c):
            p.close()


def test_pick_nodes_spreads_across_zones_by_free_disk() -> None:
    from cachemesh.cluster.cache_decls import CacheDecl, parse_nodes, pick_nodes
    from cachemesh.errors import InvalidInputError

    def node(name: str, zone: str, draining: bool = False) -> NodeRecord:
        return NodeRecord(name=name, node_id=name, advertise=f"http://{name}:1",
                          labels={"zone": zone}, draining=draining)

    nodes = [node("a1", "a"), node("a2", "a"), node("a3", "a"), node("b1", "b"),
             node("c1", "c", draining=True)]
    free = {"a1": 50, "a2": 90, "a3": 10, "b1": 20, "c1": 999}
    assert pick_nodes(nodes, 1, free) == ["a2"]  # the most free disk
    assert pick_nodes(nodes, 2, free) == ["a2", "b1"]  # then the other zone
    assert pick_nodes(nodes, 3, free) == ["a1", "a2", "b1"]
    assert pick_nodes(nodes, 9, free) == ["a1", "a2", "a3", "b1"]  # never a draining node
    assert parse_nodes("all") == "all" and parse_nodes("3") == 3
    assert parse_nodes("n2,n1") == ["n1", "n2"] and parse_nodes(["b", "a"]) == ["a", "b"]
    for bad in (0, -1, True, "", "Not_A_Name", [], [1]):
        with pytest.raises(InvalidInputError):
            parse_nodes(bad)
    decl = CacheDecl(name="m", spec={}, nodes=2, assigned=["a1", "b1"])
    assert decl.selects("b1") and not decl.selects("a2")
    assert CacheDecl(name="m", spec={}, nodes="all").selects("anyone")


def test_a_claim_after_the_pulls_lease_was_lost_takes_a_new_lease(etcd: EtcdServer,
                                                                 cluster_keys: Keys) -> None:
    peers = EtcdPeers("a", cluster_keys, lambda: kv_of(etcd), lease_ttl_s=30)
    try:
        first = hashlib.sha256(b"first").hexdigest()
        assert peers.origin_turn(first, {}, 0.0)
        lost = peers._own_lease
        once(etcd, lambda kv: kv.revoke_lease(lost))  # etcd forgot it (or it expired)
        second = hashlib.sha256(b"second").hexdigest()
        assert peers.origin_turn(second, {}, 0.0)
        assert peers._own_lease not in (0, lost)
    finally:
        peers.close()
