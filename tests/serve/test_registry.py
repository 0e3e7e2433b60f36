"""The model registry's revisions, compare-and-put and watch, for both registries
(what cluster mode's etcd registry will implement too: cluster/kv.py's model)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches
from cachemesh.config import Settings
from cachemesh.errors import ConflictError, HistoryLostError, RevisionConflictError
from cachemesh.serve.core.documents import ModelDoc, make_document
from cachemesh.serve.core.registry import (
    Change,
    MemoryModelRegistry,
    ModelRegistry,
    SqliteModelRegistry,
)
from tests.serve.conftest import RunningServer, serve_settings, toy_model


def doc(name: str, source: str = "/m/1") -> ModelDoc:
    return make_document({"versions": {"v1": {"source": source}}}, name)


@pytest.fixture(params=["memory", "sqlite"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ModelRegistry]:
    if request.param == "memory":
        yield MemoryModelRegistry()
    else:
        yield SqliteModelRegistry(Caches(Settings.from_env({"CACHEMESH_HOME": str(tmp_path)})).db)


def test_a_write_names_the_revision_it_replaces(registry: ModelRegistry):
    first = registry.put_if(doc("a"), revision=0)  # 0: only if absent
    assert first > 0 and registry.get("a") is not None
    assert registry.get("a").revision == first  # type: ignore[union-attr]
    with pytest.raises(RevisionConflictError) as lost:
        registry.put_if(doc("a", "/m/2"), revision=0)
    assert isinstance(lost.value, ConflictError)  # 409 at the boundary
    assert "expected absent, found at revision" in str(lost.value)
    second = registry.put_if(doc("a", "/m/2"), revision=first)
    assert second > first
    # Two writers that read the same revision: the first wins, the other is refused
    # and changes nothing.
    registry.put_if(doc("a", "/m/3"), revision=second)
    with pytest.raises(RevisionConflictError):
        registry.put_if(doc("a", "/m/4"), revision=second)
    assert registry.get("a").doc.versions["v1"].source == "/m/3"  # type: ignore[union-attr]


def test_removal_names_the_revision_too(registry: ModelRegistry):
    rev = registry.put_if(doc("a"), revision=0)
    with pytest.raises(RevisionConflictError):
        registry.remove_if("a", revision=rev + 1)
    assert registry.get("a") is not None
    assert registry.remove_if("a", revision=rev) is True
    assert registry.get("a") is None and registry.list() == []
    assert registry.remove_if("a") is False  # absent: nothing to do


def test_revisions_grow_and_the_snapshot_says_where_it_stands(registry: ModelRegistry):
    revs = [registry.put_if(doc(n), revision=0) for n in ("b", "a", "c")]
    revs.append(registry.put(doc("a", "/m/2")))  # unconditional: the last writer wins
    registry.remove("c")
    snap = registry.snapshot()
    assert revs == sorted(revs) and len(set(revs)) == 4
    assert [e.doc.name for e in snap.entries] == ["a", "b"]  # by name
    assert snap.entries[0].revision == revs[3] and snap.revision > revs[3]  # the delete's
    assert registry.list() == [e.doc for e in snap.entries]


def test_a_watch_sees_every_change_in_order_from_its_revision(registry: ModelRegistry):
    start = registry.snapshot().revision + 1

    async def scenario() -> tuple[list[Change], list[Change]]:
        seen: list[Change] = []
        async with contextlib.aclosing(registry.watch(start_revision=start)) as changes:
            # Writers run in threads, as the service runs them.
            await asyncio.to_thread(registry.put_if, doc("a"), revision=0)
            await asyncio.to_thread(registry.put, doc("a", "/m/2"))
            await asyncio.to_thread(registry.remove, "a")
            async for change in changes:
                seen.append(change)
                if len(seen) == 3:
                    break
        # A later watch from the same revision gets the same changes from history.
        again: list[Change] = []
        async with contextlib.aclosing(registry.watch(start_revision=start)) as changes:
            async for change in changes:
                again.append(change)
                if len(again) == 3:
                    break
        return seen, again

    seen, again = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert [(c.kind, c.name) for c in seen] == [("put", "a"), ("put", "a"), ("delete", "a")]
    assert seen[1].doc is not None and seen[1].doc.versions["v1"].source == "/m/2"
    assert seen[2].doc is None
    assert [c.revision for c in seen] == sorted(c.revision for c in seen)
    assert seen[0].revision >= start
    assert again == seen


def test_a_watch_from_before_what_the_registry_knows_is_refused(registry: ModelRegistry):
    async def first_change(start: int) -> Change:
        async with contextlib.aclosing(registry.watch(start_revision=start)) as changes:
            async for change in changes:
                return change
        raise AssertionError("no change")

    with pytest.raises(HistoryLostError):
        asyncio.run(first_change(0))


def test_sqlite_revisions_survive_a_restart(tmp_path: Path):
    db = Caches(Settings.from_env({"CACHEMESH_HOME": str(tmp_path)})).db
    before = SqliteModelRegistry(db)
    rev = before.put_if(doc("a"), revision=0)
    after = SqliteModelRegistry(db)  # a restarted server
    assert after.get("a").revision == rev  # type: ignore[union-attr]
    assert after.snapshot().revision == rev
    assert after.put_if(doc("a", "/m/2"), revision=rev) > rev
    # Changes made before it opened are not in its history.
    with pytest.raises(HistoryLostError):
        asyncio.run(anext(after.watch(start_revision=rev)))


def test_the_service_writes_over_the_revision_it_knows(tmp_path: Path):
    """Another holder of the registry changed the model (cluster mode: another node):
    this server's DELETE is refused (409), and the model is still served."""
    registry = MemoryModelRegistry()
    spec = toy_model(tmp_path / "models", "m")
    with RunningServer(serve_settings(tmp_path / "home"), [], registry=registry) as s:
        body = {"name": "m", "source": spec.source, "runtime": "custom",
                "parameters": spec.parameters}
        assert s.client.post("/api/v1/models", json=body).status_code == 201
        kept = registry.get("m")
        assert kept is not None
        registry.put(kept.doc.model_copy(update={"eager": True}))
        r = s.client.delete("/api/v1/models/m")
        assert r.status_code == 409 and "model 'm'" in r.json()["error"], r.text
        assert s.client.get("/api/v1/models/m").status_code == 200
