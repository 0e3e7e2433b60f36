"""The Slot protocol: what placement and routing see of a worker, and will see of a node.

A slot here is a fake in the test process, no worker behind it: the service routes
to it, calls it and streams from it, the pool counts its memory, and the one rule
for a lost slot applies to it, exactly as to a worker process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachemesh.runtimes import InferenceRequest, InferenceResponse, Tensor
from cachemesh.serve.core.copies import CopyPolicy
from cachemesh.serve.core.documents import doc_from_spec
from cachemesh.serve.core.registry import MemoryModelRegistry, ModelSpec
from cachemesh.serve.core.routing import Router
from cachemesh.serve.core.service import ModelService
from cachemesh.serve.core.slot import Slot
from cachemesh.serve.core.state import READY, UNLOADED, Copy, Deployment, Version
from cachemesh.serve.workers.messages import Generate, Infer, Request, Stream
from cachemesh.serve.workers.workers import WorkerHandle
from tests.serve.conftest import serve_settings

MB = 1024 * 1024


class FakeSlot:
    """A slot in this process: answers Infer with its inputs, Generate with a dict, and
    streams two chunks."""

    def __init__(self, sid: int, base: int = 100 * MB, held: int = 150 * MB) -> None:
        self.id = sid
        self.alive = True
        self.base_rss = base
        self.held = held
        self.pid = 0  # shown by the pool's memory summary (a worker's process id)
        self.calls: list[Request] = []

    @property
    def busy(self) -> bool:
        return False

    def rss(self) -> int:
        return self.held if self.alive else 0

    def call(self, message: Request) -> asyncio.Future[Any]:
        self.calls.append(message)
        future = asyncio.get_running_loop().create_future()
        if isinstance(message, Infer):
            future.set_result(InferenceResponse(message.request.inputs))
        elif isinstance(message, Generate):
            future.set_result({"slot": self.id, **message.payload})
        else:
            future.set_exception(NotImplementedError(type(message).__name__))
        return future

    async def stream(self, message: Stream) -> AsyncIterator[Any]:
        self.calls.append(message)
        for chunk in ("a", "b"):
            yield {"slot": self.id, "text": chunk}


def test_a_worker_handle_is_a_slot_and_so_is_the_fake():
    assert isinstance(WorkerHandle(1, lambda w: None), Slot)
    assert isinstance(FakeSlot(1), Slot)


@pytest.fixture
def service(tmp_path: Path) -> ModelService:
    return ModelService(serve_settings(tmp_path / "home"), registry=MemoryModelRegistry())


def declare(service: ModelService, name: str, *slots: FakeSlot, size: int = 10 * MB
            ) -> Version:
    """A model with a ready copy on each of ``slots`` (no pull, no load: set by hand)."""
    doc = doc_from_spec(ModelSpec(name=name, source=f"/nowhere/{name}"))
    label = doc.primary()
    v = Version(model=name, label=label, spec=doc.versions[label], cache=name, bucket=doc.bucket,
                phase=UNLOADED, predicted=size, capabilities={"generate": True, "stream": True})
    v.copies = [Copy(v, slot, key=f"{v.id}#{i}", state=READY, size=size, extra=i > 0)
                for i, slot in enumerate(slots)]
    dep = Deployment(doc=doc, origin="config", router=Router(doc),
                     policy=CopyPolicy.of(service.cfg, doc.scaling), versions={label: v})
    service.deployments.by_name[name] = dep
    return v


def test_requests_reach_a_slot_that_is_not_a_worker(service: ModelService):
    slot = FakeSlot(7)
    declare(service, "m", slot)
    request = InferenceRequest([Tensor.of("x", np.arange(4, dtype=np.float32))])

    async def scenario() -> tuple[Any, Any, list[Any]]:
        response = await service.infer("m", None, request)
        generated = await service.generate("m", {"prompt": "hi"})
        chunks = [c async for c in service.stream("m", {"prompt": "hi"})]
        return response, generated, chunks

    response, generated, chunks = asyncio.run(scenario())
    assert np.array_equal(response.outputs[0].data, np.arange(4, dtype=np.float32))
    assert response.model_name == "m"
    assert generated == {"slot": 7, "prompt": "hi"}
    assert [c["text"] for c in chunks] == ["a", "b"]
    assert [type(m).__name__ for m in slot.calls] == ["Infer", "Generate", "Stream"]
    assert service.inflight == 0 and service.status("m").state == READY


def test_requests_go_to_the_live_slot_with_fewest_in_flight(service: ModelService):
    a, b = FakeSlot(1), FakeSlot(2)
    v = declare(service, "m", a, b)
    v.copies[0].inflight = 3  # busy: the other copy answers
    request = InferenceRequest([Tensor.of("x", np.zeros(2, dtype=np.float32))])
    asyncio.run(service.infer("m", None, request))
    assert (len(a.calls), len(b.calls)) == (0, 1)
    b.alive = False  # a dead slot is never picked
    asyncio.run(service.infer("m", None, request))
    assert (len(a.calls), len(b.calls)) == (1, 1)


def test_the_pool_counts_a_slots_memory_figures(service: ModelService):
    slot = FakeSlot(1, base=100 * MB, held=180 * MB)
    declare(service, "m", slot, size=30 * MB)
    service.pool.workers = [slot]  # type: ignore[list-item]
    (state,) = service.pool.states()
    assert (state.id, state.alive, state.base) == (1, True, 100 * MB)
    # it holds the larger of what it says (180 MiB) and its own memory with its copies
    assert state.used == 180 * MB and state.capacity == service.budget
    assert [r.key for r in state.residents] == ["m@default#0"]
    memory = service.memory()
    assert memory["held_bytes"] == 180 * MB
    assert memory["workers"][0]["models"] == ["m"]


def test_a_lost_slot_takes_its_copies_and_leaves_the_others_serving(service: ModelService):
    a, b = FakeSlot(1), FakeSlot(2)
    v = declare(service, "two", a, b)
    lone = declare(service, "one", a)
    first = v.copies[0]
    a.alive = False
    service.loader.slot_lost(a, "node a went away")
    # the copy on b stays, and is the first copy now (not an extra one, not first to go)
    assert [c.slot for c in v.copies] == [b] and not v.copies[0].extra
    assert first.state == UNLOADED and v.state(0) == READY
    # a version whose only copy was there loads again on demand, and says why
    assert lone.copies == [] and lone.reason == "node a went away; loads again on demand"
