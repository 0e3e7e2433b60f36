"""The KV contract, run against a real etcd and against the in-memory fake alike:
the fake is held to etcd's behaviour by the same assertions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest

from cachemesh.cluster import etcd as etcd_module
from cachemesh.cluster.etcd import EtcdKV
from cachemesh.cluster.keys import Keys
from cachemesh.cluster.kv import KV, WatchEvent
from cachemesh.cluster.memory import MemoryKV
from cachemesh.errors import (
    ClusterUnavailableError,
    HistoryLostError,
    LeaseLostError,
    RevisionConflictError,
)
from tests.cluster.etcd_server import EtcdServer, free_port

T = TypeVar("T")
NewKV = Callable[[], KV]


@pytest.fixture(params=["etcd", "memory"])
def new_kv(request: pytest.FixtureRequest) -> NewKV:
    if request.param == "memory":
        return MemoryKV
    server: EtcdServer = request.getfixturevalue("etcd")
    return lambda: EtcdKV([server.endpoint], timeout=2.0)


def run(new_kv: NewKV, scenario: Callable[[KV], Awaitable[T]]) -> T:
    async def main() -> T:
        kv = new_kv()
        try:
            return await scenario(kv)
        finally:
            await kv.close()

    return asyncio.run(main())


async def take(events: object, n: int, timeout: float = 5.0) -> list[WatchEvent]:
    got: list[WatchEvent] = []

    async def collect() -> None:
        async for event in events:  # type: ignore[attr-defined]
            got.append(event)
            if len(got) == n:
                return

    await asyncio.wait_for(collect(), timeout)
    return got


def test_put_get_prefix_delete(new_kv: NewKV, cluster_keys: Keys) -> None:
    p = cluster_keys.prefix

    async def scenario(kv: KV) -> None:
        assert await kv.get(p + "a") is None
        r1 = await kv.put(p + "a", b"1")
        r2 = await kv.put(p + "a", b"2")
        await kv.put(p + "b/x", b"3")
        await kv.put(p.rstrip("/") + "0", b"outside")  # the next key after the prefix
        a = await kv.get(p + "a")
        assert a is not None and a.value == b"2"
        assert (a.create_revision, a.mod_revision, a.version) == (r1, r2, 2)
        snapshot = await kv.get_prefix(p)
        assert [(x.key, x.value) for x in snapshot.kvs] == [(p + "a", b"2"), (p + "b/x", b"3")]
        assert snapshot.revision >= r2 + 1
        assert await kv.delete(p + "a") is True
        assert await kv.delete(p + "a") is False
        assert await kv.get(p + "a") is None
        await kv.delete(p.rstrip("/") + "0")

    run(new_kv, scenario)


def test_compare_and_put_conflicts(new_kv: NewKV, cluster_keys: Keys) -> None:
    key = cluster_keys.model("m")

    async def scenario(kv: KV) -> None:
        created = await kv.put_if(key, b"v1", mod_revision=0)  # create-if-absent
        with pytest.raises(RevisionConflictError) as exc:
            await kv.put_if(key, b"again", mod_revision=0)
        assert (exc.value.expected, exc.value.actual) == (0, created)
        # Two writers read the same revision: the first wins, the second learns where it is.
        updated = await kv.put_if(key, b"v2", mod_revision=created)
        with pytest.raises(RevisionConflictError) as exc:
            await kv.put_if(key, b"v2-other", mod_revision=created)
        assert exc.value.actual == updated
        current = await kv.get(key)
        assert current is not None and current.value == b"v2"
        with pytest.raises(RevisionConflictError):
            await kv.delete(key, mod_revision=created)
        assert await kv.delete(key, mod_revision=updated) is True
        assert await kv.delete(key, mod_revision=updated) is False
        with pytest.raises(RevisionConflictError) as exc:
            await kv.put_if(key, b"v3", mod_revision=updated)  # gone: actual is 0
        assert exc.value.actual == 0

    run(new_kv, scenario)


def test_watch_delivers_and_resumes_from_a_revision(new_kv: NewKV, cluster_keys: Keys) -> None:
    p = cluster_keys.prefix

    async def scenario(kv: KV) -> None:
        start = (await kv.get_prefix(p)).revision + 1
        async with contextlib.aclosing(kv.watch(p, prefix=True, start_revision=start)) as events:
            waiter = asyncio.create_task(take(events, 3))
            await asyncio.sleep(0.2)  # the watch is live before the writes
            await kv.put(p + "x", b"1")
            await kv.put(p + "y", b"2")
            await kv.delete(p + "x")
            got = await waiter
        assert [(e.kind, e.kv.key) for e in got] == [
            ("put", p + "x"), ("put", p + "y"), ("delete", p + "x")]
        assert got[0].kv.value == b"1" and got[2].kv.value == b""
        assert [e.revision for e in got] == sorted({e.revision for e in got})
        # A watch started later from a past revision gets the same history, from there on.
        async with contextlib.aclosing(
                kv.watch(p, prefix=True, start_revision=got[1].revision)) as again:
            replay = await take(again, 2)
        assert replay == got[1:]
        # Watching one key: only that key.
        async with contextlib.aclosing(kv.watch(p + "y", start_revision=start)) as one:
            only = await take(one, 1)
        assert only[0].kv.key == p + "y"

    run(new_kv, scenario)


def test_leases_bind_keys(new_kv: NewKV, cluster_keys: Keys) -> None:
    key = cluster_keys.node("n1")

    async def scenario(kv: KV) -> None:
        lease = await kv.grant_lease(30)
        assert 0 < (await kv.keep_alive(lease)) <= 30
        ttl = await kv.lease_ttl(lease)
        assert ttl is not None and 0 < ttl <= 30
        await kv.put_if(key, b"rec", mod_revision=0, lease=lease)
        found = await kv.get(key)
        assert found is not None and found.lease == lease
        assert await kv.revoke_lease(lease) is True
        assert await kv.get(key) is None  # revoking deleted the key
        assert await kv.lease_ttl(lease) is None
        assert await kv.revoke_lease(lease) is False
        with pytest.raises(LeaseLostError):
            await kv.keep_alive(lease)
        with pytest.raises(LeaseLostError):
            await kv.put_if(key, b"rec", mod_revision=0, lease=lease)

    run(new_kv, scenario)


def test_memory_lease_expires_and_watchers_see_the_delete(cluster_keys: Keys) -> None:
    """The fake's lease clock (etcd's own expiry is tested through node records)."""
    key = cluster_keys.node("n1")

    async def scenario(kv: KV) -> float:
        lease = await kv.grant_lease(1)
        rev = await kv.put(key, b"rec", lease=lease)
        began = time.monotonic()
        async with contextlib.aclosing(kv.watch(key, start_revision=rev + 1)) as events:
            [event] = await take(events, 1)
        assert event.kind == "delete"
        assert await kv.get(key) is None
        return time.monotonic() - began

    assert 0.8 < run(MemoryKV, scenario) < 2.0


def test_large_prefix_is_read_in_pages_at_one_revision(
        etcd: EtcdServer, cluster_keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_module, "_PAGE", 3)
    p = cluster_keys.prefix

    async def scenario(kv: KV) -> None:
        for i in range(8):
            await kv.put(f"{p}k{i}", str(i).encode())
        snapshot = await kv.get_prefix(p)
        assert [x.value for x in snapshot.kvs] == [str(i).encode() for i in range(8)]

    run(lambda: EtcdKV([etcd.endpoint]), scenario)


def test_watch_of_compacted_history_says_so(etcd: EtcdServer, cluster_keys: Keys) -> None:
    key = cluster_keys.model("c")

    async def scenario(kv: KV) -> None:
        first = await kv.put(key, b"1")
        last = await kv.put(key, b"2")
        async with httpx.AsyncClient(trust_env=False) as http:
            compacted = await http.post(f"http://{etcd.endpoint}/v3/kv/compaction",
                                        json={"revision": str(last)})
            compacted.raise_for_status()
        with pytest.raises(HistoryLostError) as exc:
            async with contextlib.aclosing(kv.watch(key, start_revision=first)) as events:
                await take(events, 1)
        assert exc.value.revision == last

    run(lambda: EtcdKV([etcd.endpoint]), scenario)


def test_unreachable_etcd_and_failover_to_the_next_endpoint(
        etcd: EtcdServer, cluster_keys: Keys) -> None:
    dead = f"127.0.0.1:{free_port()}"

    async def scenario() -> None:
        alone = EtcdKV([dead], timeout=1.0)
        began = time.monotonic()
        with pytest.raises(ClusterUnavailableError, match=dead):
            await alone.get(cluster_keys.epoch)
        assert time.monotonic() - began < 1.0  # refused at once, no 120 s gRPC backoff
        await alone.close()
        both = EtcdKV([dead, etcd.endpoint], timeout=1.0)
        await both.put(cluster_keys.epoch, b"e")
        found = await both.get(cluster_keys.epoch)
        assert found is not None and found.value == b"e"
        await both.close()

    asyncio.run(scenario())
