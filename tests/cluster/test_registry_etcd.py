"""The model registry of cluster mode (serve/cluster/registry_etcd.py) against a real etcd: two
registries stand for two nodes sharing one prefix."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cachemesh.cluster import EtcdKV, Keys
from cachemesh.errors import ClusterUnavailableError, RevisionConflictError
from cachemesh.serve.cluster.registry_etcd import EtcdModelRegistry
from cachemesh.serve.core.documents import make_document
from tests.cluster.etcd_server import EtcdServer


def _doc(name: str, source: str = "/models/x", share: int = 100):
    return make_document({"versions": {"v1": {"source": source}}, "traffic": {"v1": share}},
                         name)


def test_compare_and_put_idempotence_watch_and_local_copy(
        etcd: EtcdServer, cluster_keys: Keys, tmp_path: Path) -> None:
    async def scenario() -> None:
        down = {"now": False}
        kv1, kv2 = EtcdKV([etcd.endpoint], timeout=2.0), EtcdKV([etcd.endpoint], timeout=2.0)
        one = EtcdModelRegistry(kv1, cluster_keys, tmp_path / "one", degraded=lambda: down["now"])
        two = EtcdModelRegistry(kv2, cluster_keys, tmp_path / "two")
        await one.open()
        await two.open()
        changes = two.watch(start_revision=two.snapshot().revision + 1)
        try:
            # from a thread, as deployments.py calls it
            rev = await asyncio.to_thread(one.put_if, _doc("m"), revision=0)
            change = await asyncio.wait_for(anext(changes), 5)
            assert (change.kind, change.name, change.revision) == ("put", "m", rev)
            assert two.get("m") is not None and two.get("m").revision == rev
            # the same document again: not written, whatever revision it names
            assert await asyncio.to_thread(two.put_if, _doc("m"), revision=0) == rev
            # another document on a stale revision loses; on the current one it wins
            with pytest.raises(RevisionConflictError, match="model 'm'"):
                await two.put_doc(_doc("m", share=100, source="/models/y"), revision=0)
            newer = await two.put_doc(_doc("m", source="/models/y"), revision=rev)
            assert newer > rev
            assert (await asyncio.wait_for(anext(changes), 5)).revision == newer
            # removed: a tombstone in the local copy
            assert await asyncio.to_thread(one.remove_if, "m", revision=newer)
            assert (await asyncio.wait_for(anext(changes), 5)).kind == "delete"
            await asyncio.sleep(0.2)
            local = json.loads(one.path.read_text())
            assert local["prefix"] == cluster_keys.prefix and local["models"]["m"]["doc"] is None
            assert one.path.stat().st_mode & 0o077 == 0  # sources may carry credentials
            # degraded: refused at once, with what to expect
            down["now"] = True
            with pytest.raises(ClusterUnavailableError, match="cannot be reached"):
                await asyncio.to_thread(one.put_if, _doc("n"), revision=0)
            # a sync write on the event loop itself is a programming error, not a hang
            with pytest.raises(RuntimeError, match="in a thread"):
                two.put_if(_doc("n"), revision=0)
        finally:
            await changes.aclose()
            await one.close()
            await two.close()
            await kv1.close()
            await kv2.close()

    asyncio.run(scenario())
