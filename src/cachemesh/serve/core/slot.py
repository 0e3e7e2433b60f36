"""A slot: something that holds copies of models and answers the requests sent to them.

Placement and routing see slots through this protocol only: placement decides over
snapshots of them (``pool.py`` takes them, ``placement.py`` decides), and a request
goes to a ready copy (``copies.pick``) and then to that copy's slot. Today each slot
is a worker process of this node (:class:`~.workers.WorkerHandle`, kept by
``pool.py``). In cluster mode another node is not a slot: a request it serves is
forwarded as bytes before any adapter parses it (``forward.py``, ``placer.py``; why, in
docs/architecture.md), and that node places the copy on its own workers.

A slot speaks the requests of ``messages.py``: ``call`` sends one and resolves to
its answer (a :class:`~.messages.Loaded` for a Load, an InferenceResponse for an
Infer, ...) or raises the error it translates to; ``stream`` yields a stream's
chunks. A slot that dies fails what is in flight on it (WorkerCrashedError, or
ModelLoadError for a load; requests are not replayed) and its owner reports it to
:meth:`~.loading.Loader.slot_lost`, the one rule for a lost slot.

Memory figures: ``base_rss``, what the slot holds with no model loaded (a
worker's own memory, the frameworks it imported included); ``rss()``, what it
holds now (0 once it is dead). The pool adds the budget they share.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, runtime_checkable

from ..workers.messages import Request, Stream


@runtime_checkable
class Slot(Protocol):
    id: int
    alive: bool
    base_rss: int

    @property
    def busy(self) -> bool:
        """A call to it has not been answered yet."""

    def rss(self) -> int: ...

    def call(self, message: Request) -> Awaitable[Any]: ...

    def stream(self, message: Stream) -> AsyncIterator[Any]: ...
