"""Membership and election logic on the in-memory fake: fast, and able to cause faults
that a real etcd cannot be made to cause on cue (the name taken during an outage)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cachemesh.cluster import Election, Keys, Membership, NodeRecord, Rejoin, State
from cachemesh.cluster.memory import MemoryKV
from tests.cluster.test_membership import until

KEYS = Keys()


def node(kv: MemoryKV, home: Path, name: str = "n1") -> Membership:
    return Membership(kv, home=home, name=name, advertise="http://127.0.0.1:8008",
                      lease_ttl_s=2, keys=KEYS, record_interval_s=0.1)


def test_down_degrades_then_up_resyncs(tmp_path: Path) -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        m = node(kv, tmp_path)
        await m.start()
        election = Election(m)
        election.start()
        await asyncio.wait_for(election.wait_leader(True), 2.0)
        kv.down = True
        await until(lambda: m.degraded, 2.0, "degraded")
        await until(lambda: not election.is_leader, 1.0, "a degraded node does not lead")
        m.update(draining=True)
        kv.down = False
        await until(lambda: m.state is State.ACTIVE, 3.0, "active again")
        found = await kv.get(KEYS.node("n1"))
        assert found is not None and NodeRecord.from_bytes(found.value).draining
        await asyncio.wait_for(election.wait_leader(True), 3.0)  # same lease: same place
        assert m.status().rejoins == 0
        await election.stop()
        await m.stop()

    asyncio.run(scenario())


def test_wiped_store_rejoin_is_reported_as_data_loss(tmp_path: Path) -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        m = node(kv, tmp_path)
        heard: list[Rejoin] = []

        async def listener(event: Rejoin) -> None:
            heard.append(event)

        m.on_rejoin(listener)
        await m.start()
        kv.wipe()
        await until(lambda: heard, 3.0, "rejoined")
        assert heard[0].data_lost and heard[0].lease == m.lease
        assert await kv.get(KEYS.node("n1")) is not None
        await m.stop()

    asyncio.run(scenario())


def test_name_taken_during_an_outage_the_returning_node_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        m = node(kv, tmp_path / "a")
        await m.start()
        # Its lease is revoked (as if it expired in a partition) and another store joins
        # under the same name before this node gets back.
        kv.down = True
        await until(lambda: m.degraded, 2.0, "degraded")
        kv.down = False
        await kv.revoke_lease(m.lease)
        other = node(kv, tmp_path / "b")
        await other.start()
        error = await asyncio.wait_for(m.wait_refused(), 3.0)
        assert "taken by a live node" in str(error)
        found = await kv.get(KEYS.node("n1"))
        assert found is not None and found.lease == other.lease  # the live node keeps it
        await m.stop()
        await other.stop()

    asyncio.run(scenario())


def test_three_candidates_lead_in_join_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        members = [node(kv, tmp_path / n, n) for n in ("a", "b", "c")]
        elections = []
        for m in members:
            await m.start()
            e = Election(m)
            e.start()
            elections.append(e)
        await asyncio.wait_for(elections[0].wait_leader(True), 2.0)
        # The middle one goes: nothing changes at the top.
        await kv.revoke_lease(members[1].lease)
        await asyncio.sleep(0.1)
        assert [e.is_leader for e in elections] == [True, False, False]
        # The leader's lease goes: the last one leads (b's rejoin stands behind it).
        await kv.revoke_lease(members[0].lease)
        await asyncio.wait_for(elections[2].wait_leader(True), 2.0)
        await until(lambda: members[0].state is State.ACTIVE and members[0].lease, 3.0, "a rejoins")
        await asyncio.sleep(0.2)
        assert [e.is_leader for e in elections] == [False, False, True]
        for e, m in zip(elections, members, strict=True):
            await e.stop()
            await m.stop()

    asyncio.run(scenario())
