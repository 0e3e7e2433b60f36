"""etcd goes away and comes back, with its data or empty: the node degrades, keeps
running, and resyncs by itself (issue 17: within 10 s). A real etcd of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from cachemesh.cluster import EtcdKV, Keys, Membership, NodeRecord, Rejoin, State, WatchEvent
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.test_membership import until

KEYS = Keys()


async def start_node(etcd: EtcdServer, home: Path) -> Membership:
    kv = EtcdKV([etcd.endpoint], timeout=1.0)
    node = Membership(kv, home=home, name="node-f", advertise="http://127.0.0.1:8008",
                      lease_ttl_s=2, keys=KEYS, record_interval_s=0.2)
    await node.start()
    return node


async def published(node: Membership, **fields: object) -> bool:
    found = await node.kv.get(KEYS.node(node.name))
    if found is None or found.lease != node.lease:
        return False
    record = NodeRecord.from_bytes(found.value)
    return all(getattr(record, k) == v for k, v in fields.items())


def test_etcd_stopped_then_restarted_node_degrades_and_resyncs(
        own_etcd: EtcdServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        node = await start_node(own_etcd, tmp_path / "store")
        lease = node.lease
        watcher_kv = EtcdKV([own_etcd.endpoint], timeout=1.0)
        start = (await watcher_kv.get_prefix(KEYS.models)).revision + 1
        seen: list[WatchEvent] = []

        async def follow() -> None:
            async with contextlib.aclosing(
                    watcher_kv.watch(KEYS.models, prefix=True, start_revision=start)) as events:
                async for event in events:
                    seen.append(event)

        follower = asyncio.create_task(follow())
        await watcher_kv.put(KEYS.model("before"), b"1")
        await until(lambda: len(seen) == 1, 3.0, "the watch sees the first put")

        own_etcd.stop()
        await until(lambda: node.degraded, 3.0, "the node reports itself degraded")
        assert node.status().degraded and node.status().last_error
        node.update(memory_used_bytes=777)  # what changes meanwhile is kept for later
        await asyncio.sleep(0.5)
        assert node.degraded and not node._task.done()  # type: ignore[union-attr]

        own_etcd.start()  # same data directory
        took = await until(lambda: node.state is State.ACTIVE, 10.0, "the node resyncs")
        assert await until(lambda: published(node, memory_used_bytes=777), 3.0,
                           "the change made during the outage reaches etcd") < 3.0
        assert node.lease == lease  # etcd kept the lease: same registration
        assert node.status().rejoins == 0 and node.status().data_losses == 0
        # The watch resumed where it stopped: the next event arrives, nothing repeated.
        await watcher_kv.put(KEYS.model("after"), b"2")
        await until(lambda: len(seen) == 2, 5.0, "the watch resumes after the restart")
        assert [e.kv.key for e in seen] == [KEYS.model("before"), KEYS.model("after")]
        follower.cancel()
        await node.stop()
        await node.kv.close()
        await watcher_kv.close()
        assert took < 10.0

    asyncio.run(scenario())


def test_etcd_replaced_by_an_empty_one_node_re_registers(
        own_etcd: EtcdServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        node = await start_node(own_etcd, tmp_path / "store")
        old_lease = node.lease
        rejoins: list[Rejoin] = []

        async def heard(event: Rejoin) -> None:
            rejoins.append(event)

        node.on_rejoin(heard)
        own_etcd.replace()  # same address, empty data directory
        began = time.monotonic()
        await until(lambda: published(node), 10.0, "the node re-registers in the new etcd")
        assert time.monotonic() - began < 10.0
        assert node.state is State.ACTIVE and node.lease != old_lease
        status = node.status()
        assert (status.rejoins, status.data_losses) == (1, 1)
        assert rejoins == [Rejoin(lease=node.lease, data_lost=True)]
        await node.stop()
        await node.kv.close()

    asyncio.run(scenario())
