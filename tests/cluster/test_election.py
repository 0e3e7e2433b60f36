"""Leader election on a real etcd: one leader, and a handover when its lease dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from cachemesh.cluster import Election, Keys
from tests.cluster.conftest import NodeProcess
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.test_membership import member


def test_one_leader_and_handover_on_leaving(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path) -> None:
    async def scenario() -> None:
        nodes = [member(etcd, cluster_keys, tmp_path / n, n) for n in ("e1", "e2", "e3")]
        elections = []
        for node in nodes:  # join in order: e1 stands first
            await node.start()
            election = Election(node)
            election.start()
            elections.append(election)
        await asyncio.wait_for(elections[0].wait_leader(True), 5.0)
        await asyncio.sleep(0.3)
        assert [e.is_leader for e in elections] == [True, False, False]
        leader = await elections[2].leader()
        assert leader is not None and leader.name == "e1"
        # The leader leaves: the next in line leads, and only it.
        await elections[0].stop()
        await nodes[0].stop()
        await asyncio.wait_for(elections[1].wait_leader(True), 5.0)
        assert not elections[2].is_leader
        leader = await elections[2].leader()
        assert leader is not None and leader.name == "e2"
        for election, node in zip(elections[1:], nodes[1:], strict=True):
            await election.stop()
            await node.stop()
        for node in nodes:
            await node.kv.close()

    asyncio.run(scenario())


def test_leader_killed_its_lease_dies_and_the_next_node_leads(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path,
        node_process: Callable[..., NodeProcess]) -> None:
    first = node_process(tmp_path / "leader", "leader-1", ttl=2)
    assert first.next_event()["event"] == "joined"
    assert first.next_event()["event"] == "leader"

    async def scenario() -> float:
        node = member(etcd, cluster_keys, tmp_path / "follower", "follower-1")
        await node.start()
        election = Election(node)
        election.start()
        await asyncio.sleep(0.5)
        assert not election.is_leader
        first.kill()  # no resignation: only the lease's expiry can hand over
        began = time.monotonic()
        await asyncio.wait_for(election.wait_leader(True), 8.0)
        took = time.monotonic() - began
        leader = await election.leader()
        assert leader is not None and leader.name == "follower-1"
        await election.stop()
        await node.stop()
        await node.kv.close()
        return took

    took = asyncio.run(scenario())
    assert 1.0 < took < 5.0  # the 2 s lease ran out (etcd checks every 0.5 s)
