"""Node membership against a real etcd: the record, the name, the lease, a crash."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.cluster import EtcdKV, Keys, Membership, NodeRecord, State
from cachemesh.cluster.identity import node_id
from cachemesh.config import Settings
from cachemesh.errors import InvalidInputError, NodeNameTakenError
from tests.cluster.conftest import NodeProcess
from tests.cluster.etcd_server import EtcdServer


def member(etcd: EtcdServer, keys: Keys, home: Path, name: str, **kw: object) -> Membership:
    kv = EtcdKV([etcd.endpoint], timeout=2.0)
    return Membership(kv, home=home, name=name, advertise="http://127.0.0.1:8008",
                      lease_ttl_s=2, keys=keys, **kw)  # type: ignore[arg-type]


async def record_of(kv: EtcdKV, keys: Keys, name: str) -> tuple[NodeRecord, int] | None:
    found = await kv.get(keys.node(name))
    return (NodeRecord.from_bytes(found.value), found.lease) if found else None


async def until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll an async or sync predicate; returns the seconds it took."""
    began = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def test_join_publish_and_leave(etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path) -> None:
    async def scenario() -> None:
        node = member(etcd, cluster_keys, tmp_path / "a", "node-a", labels={"zone": "z1"},
                      http="127.0.0.1:8008", grpc="127.0.0.1:8033", capacity_bytes=8 << 30,
                      record_interval_s=0.2)
        await node.start()
        assert node.state is State.ACTIVE and not node.degraded
        found = await record_of(node.kv, cluster_keys, "node-a")  # type: ignore[arg-type]
        assert found is not None
        record, lease = found
        assert lease == node.lease != 0
        assert record.node_id == node_id(tmp_path / "a")
        assert (record.labels, record.grpc, record.capacity_bytes) == (
            {"zone": "z1"}, "127.0.0.1:8033", 8 << 30)
        assert [n.name for n in await node.nodes()] == ["node-a"]
        # Changes reach etcd, coalesced.
        node.update(memory_used_bytes=123)
        node.update(memory_used_bytes=456)

        async def published() -> bool:
            got = await record_of(node.kv, cluster_keys, "node-a")  # type: ignore[arg-type]
            return got is not None and got[0].memory_used_bytes == 456

        await until(published, 3.0, "the record's update reaches etcd")
        await node.stop()
        assert node.state is State.STOPPED
        assert await record_of(node.kv, cluster_keys, "node-a") is None  # type: ignore[arg-type]
        assert await node.kv.lease_ttl(lease) is None  # revoked, not left to expire
        await node.kv.close()

    asyncio.run(scenario())


def test_a_second_live_node_with_the_same_name_refuses_to_start(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path) -> None:
    async def scenario() -> None:
        first = member(etcd, cluster_keys, tmp_path / "a", "same")
        await first.start()
        other_store = member(etcd, cluster_keys, tmp_path / "b", "same")
        with pytest.raises(NodeNameTakenError, match="'same' is taken by a live node"):
            await other_store.start()
        same_store = member(etcd, cluster_keys, tmp_path / "a", "same")
        with pytest.raises(NodeNameTakenError, match="already runs on the store"):
            await same_store.start()
        # The refusals changed nothing: the first node's record and lease stand.
        found = await record_of(first.kv, cluster_keys, "same")  # type: ignore[arg-type]
        assert found is not None and found[1] == first.lease
        assert found[0].node_id == first.node_id
        await first.stop()
        await other_store.start()  # the name is free once its holder left
        await other_store.stop()
        for m in (first, other_store, same_store):
            await m.kv.close()

    asyncio.run(scenario())


def test_restart_takes_its_place_back_and_revokes_the_old_lease(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path,
        node_process: Callable[..., NodeProcess]) -> None:
    home = tmp_path / "store"
    crashed = node_process(home, "node-r", ttl=10)  # long TTL: its record would outlive us
    joined = crashed.next_event()
    assert joined["event"] == "joined"
    crashed.kill()

    async def scenario() -> None:
        node = member(etcd, cluster_keys, home, "node-r")
        began = time.monotonic()
        await node.start()
        assert time.monotonic() - began < 2.0  # did not wait for the old lease to run out
        found = await record_of(node.kv, cluster_keys, "node-r")  # type: ignore[arg-type]
        assert found is not None and found[1] == node.lease != joined["lease"]
        assert found[0].node_id == joined["node_id"]
        assert await node.kv.lease_ttl(int(joined["lease"])) is None  # type: ignore[call-overload]
        await node.stop()
        await node.kv.close()

    asyncio.run(scenario())


def test_lease_expiry_removes_a_dead_nodes_record(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path,
        node_process: Callable[..., NodeProcess]) -> None:
    dead = node_process(tmp_path / "store", "node-d", ttl=2)
    assert dead.next_event()["event"] == "joined"

    async def scenario() -> float:
        kv = EtcdKV([etcd.endpoint])
        assert await record_of(kv, cluster_keys, "node-d") is not None
        dead.kill()
        took = await until(lambda: _absent(kv, cluster_keys.node("node-d")), 6.0,
                           "the SIGKILLed node's record expires with its lease")
        await kv.close()
        return took

    assert asyncio.run(scenario()) < 4.0  # TTL 2 s, etcd checks leases every 0.5 s


async def _absent(kv: EtcdKV, key: str) -> bool:
    return await kv.get(key) is None


def test_from_settings_refuses_without_a_token(tmp_path: Path) -> None:
    settings = Settings.from_env({"CACHEMESH_HOME": str(tmp_path),
                                  "CACHEMESH_CLUSTER": "etcd://127.0.0.1:2379"})
    with pytest.raises(InvalidInputError, match="CACHEMESH_CLUSTER_TOKEN"):
        Membership.from_settings(EtcdKV(["127.0.0.1:2379"]), settings)
