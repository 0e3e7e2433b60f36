"""The runtime base class: how a kind of model is loaded and asked.

A runtime runs inside a worker process (``serve/workers/worker.py``), one instance per
loaded model. Its methods are plain blocking calls; the worker runs loads and
predictions on its own threads, and the server never calls a runtime directly.

    class MyRuntime(Runtime):
        name = "mine"                         # what --model NAME=SRC,runtime=mine picks

        @classmethod
        def detect(cls, path): ...            # > 0 if this directory looks like ours
        def load(self): ...                   # read files under self.settings.path
        def predict(self, request): ...       # InferenceRequest -> InferenceResponse
        def unload(self): ...                 # optional: free what load took

Optional hooks: ``generate`` (one JSON-like payload in, one out) and ``stream``
(an iterator of chunks) for generative models (payloads: ``generation.py``; a
stream is closed when its client goes away); ``stats`` for running counts; ``metadata`` for V2 model
metadata, and ``describe`` for the same before a load; ``memory_bytes`` when the runtime knows its size better than the
worker's RSS does (memory mapped or GPU weights).

Runtimes are found through the entry-point group ``cachemesh.runtimes``
(``runtimes/__init__.py``), so a package adds one by declaring, in its
pyproject.toml::

    [project.entry-points."cachemesh.runtimes"]
    mine = "my_package.runtime:MyRuntime"

Errors: raise :class:`~cachemesh.errors.InferenceInputError` for what the
request got wrong (the client gets a 4xx); anything else raised by ``predict``
is the model's fault (5xx).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .types import InferenceRequest, InferenceResponse


@dataclass
class ModelSettings:
    """What a runtime is told about the model it loads."""

    name: str
    path: Path  # the model's files: a cache view, read-only
    version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # runtime options
    inputs: list[dict[str, Any]] = field(default_factory=list)  # declared V2 tensor metadata
    outputs: list[dict[str, Any]] = field(default_factory=list)


class Runtime:
    """Base class of every runtime. Subclass it; override what you need."""

    #: The name users give as ``runtime=``; also the entry-point name.
    name: ClassVar[str] = ""
    #: Whether ``predict`` takes several requests stacked along the first dimension
    #: of every input and answers row for row (see ``runtimes/batching.py``).
    batchable: ClassVar[bool] = False
    #: Whether the server has workers import this runtime's framework (``preload``) as
    #: soon as a model of it is declared, ahead of its first request: worth it when
    #: the imports take seconds (torch), not when they are cheap.
    preload_at_start: ClassVar[bool] = False
    #: Packages whose files the worker reads into the page cache while ``preload``
    #: imports them: importing torch from a cold disk is mostly page faults into
    #: its shared libraries, one at a time; read ahead, they come in at disk speed.
    preload_packages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    @classmethod
    def detect(cls, path: Path) -> int:
        """How sure this runtime is that it can serve the model in ``path`` (0: not at all)."""
        return 0

    @classmethod
    def preload(cls) -> None:
        """Import heavy libraries before a load is measured, so that a model's
        measured size is the model's and not its framework's."""

    def load(self) -> None:
        """Read the model from ``self.settings.path``."""

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        raise NotImplementedError(f"runtime {self.name!r} does not implement predict")

    def unload(self) -> None:
        """Free what :meth:`load` took. The worker also drops the instance."""

    def memory_bytes(self) -> int | None:
        """The model's size in memory if the runtime knows it; None: measure RSS."""
        return None

    def metadata(self) -> dict[str, Any]:
        """V2 model metadata: ``{"inputs": [...], "outputs": [...], "platform": ...}``."""
        return {"inputs": self.settings.inputs, "outputs": self.settings.outputs}

    @classmethod
    def describe(cls, settings: ModelSettings) -> dict[str, Any] | None:
        """V2 model metadata read from the files without loading the model (an ONNX
        graph, a config file), for clients that ask before the first request; None
        when only a load can tell (the server then loads the model to answer). It
        runs in the server's own process: read files, never run code from them. What
        it returns must be what :meth:`metadata` says once loaded."""
        return None

    # -- optional hooks for generative models (issue 7 builds on these) --------

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError(f"runtime {self.name!r} does not generate")

    def stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError(f"runtime {self.name!r} does not stream")

    @classmethod
    def supports(cls, hook: str) -> bool:
        """Whether a subclass implements ``predict``, or the optional ``generate`` or
        ``stream`` hook."""
        return getattr(cls, hook, None) is not getattr(Runtime, hook)

    def capabilities(self) -> dict[str, bool]:
        """Which optional hooks this model answers (a wrapper asks what it wraps)."""
        return {hook: type(self).supports(hook) for hook in ("predict", "generate", "stream")}

    def stats(self) -> dict[str, float]:
        """Running counts a runtime keeps (tokens generated, streams cancelled); the
        worker's STATS reply carries them per model."""
        return {}
