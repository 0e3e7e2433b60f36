"""The messages between the server and its worker processes: one dataclass each.

Server -> worker, a request (``rid``: its id, set by the sender, ``WorkerHandle``)::

    Load(key, runtime, settings, integrity)  load a copy of a model as ``key``  -> Loaded
    Unload(key)                               drop the copy ``key``               -> Unloaded
    Infer(key, request)                       a V2 inference               -> InferenceResponse
    Generate(key, payload)                    the runtime's ``generate`` hook     -> its dict
    Stream(key, payload)                      the runtime's ``stream`` hook  -> Chunk..., End
    Stats()                                   every copy's runtime counters    -> WorkerStats
    Preload(runtime, paths)                   import a runtime's framework ahead of its
                                              first load, reading ``paths`` meanwhile
                                                                                -> Preloaded
    Cancel(rid)                               the stream ``rid`` lost its reader (a client
                                              went away): the worker closes it; no answer

Worker -> server, an answer::

    Ready(pid, rss)                           once, when the worker has started
    Result(rid, value)                        the answer to request ``rid`` (right column above)
    Chunk(rid, value), End(rid)               a stream's pieces, then its end
    Failure(rid, kind, message, corrupt_blob) request ``rid`` failed; ``kind`` says how
                                              (:data:`FailureKind`)

On the wire (``ipc.py``) a message travels as its class's tag and its fields in
order, not as the pickled dataclass: the wrapper cost 2.3 us to pickle and 1.7 us
to unpickle that way, against 0.6 and 0.5 us as a tag (a bare tuple: 0.4 and 0.3;
Python 3.11, 2026-12), on a path that answers a request in about 130 us of the
server's CPU (docs/benchmarks.md, "serve").
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

if TYPE_CHECKING:
    from ...runtimes import InferenceRequest, ModelSettings

#: How a request failed: the input is wrong (4xx); the model raised; the load failed;
#: the copy is not on this worker; the load found a cached file changed (load/integrity.py).
FailureKind = Literal["input", "model", "load", "missing", "corrupt"]

_BY_TAG: dict[int, type[Message]] = {}
M = TypeVar("M", bound="Message")


class Message:
    """Base of every message; :func:`_message` gives each its tag."""

    __slots__ = ()
    TAG: ClassVar[int]
    # The fields' values in order (what ipc.py writes).
    values: ClassVar[Callable[[Any], tuple[Any, ...]]]


def _message(tag: int) -> Callable[[type[M]], type[M]]:
    def register(cls: type[M]) -> type[M]:
        cls = dataclass(slots=True)(cls)
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        getter = operator.attrgetter(*names)
        cls.TAG = tag
        cls.values = staticmethod(getter if len(names) > 1 else lambda m: (getter(m),))
        assert tag not in _BY_TAG, tag
        _BY_TAG[tag] = cls
        return cls

    return register


def from_wire(tag: int, values: tuple[Any, ...]) -> Message:
    """The message that ipc.py read as ``(tag, values)``."""
    return _BY_TAG[tag](*values)


# -- requests: server -> worker ---------------------------------------------------------


@dataclass(frozen=True)
class IntegrityCheck:
    """What a load checks the cached files against (load/integrity.py): each file's
    path in the view -> (sha256, size, commit time); ``full``: re-hash every file."""

    files: dict[str, tuple[str, int, float]]
    full: bool


@_message(1)
class Load(Message):
    key: str
    runtime: str
    settings: ModelSettings
    integrity: IntegrityCheck | None = None
    rid: int = 0


@_message(2)
class Unload(Message):
    key: str
    rid: int = 0


@_message(3)
class Infer(Message):
    key: str
    request: InferenceRequest
    rid: int = 0


@_message(4)
class Generate(Message):
    key: str
    payload: dict[str, Any]
    rid: int = 0


@_message(5)
class Stream(Message):
    key: str
    payload: dict[str, Any]
    rid: int = 0


@_message(6)
class Stats(Message):
    rid: int = 0


@_message(7)
class Cancel(Message):
    rid: int  # the stream's


@_message(8)
class Preload(Message):
    runtime: str
    paths: list[str] = field(default_factory=list)
    rid: int = 0


Request = Load | Unload | Infer | Generate | Stream | Stats | Preload


# -- answers: worker -> server ------------------------------------------------------------


@_message(20)
class Ready(Message):
    pid: int
    rss: int  # the worker's own memory, before any model


@_message(21)
class Result(Message):
    rid: int
    value: Any


@_message(22)
class Chunk(Message):
    rid: int
    value: Any


@_message(23)
class End(Message):
    rid: int


@_message(24)
class Failure(Message):
    rid: int
    kind: FailureKind
    message: str
    corrupt_blob: str = ""  # kind "corrupt": the sha256 of the changed file


# -- what a Result holds (pickled as they are: not on the inference path) -------------------


@dataclass(frozen=True)
class Loaded:
    """A copy loaded: its size, what the worker held around the load, what it can do."""

    size: int  # bytes: the runtime's own figure when ``reported``, else the RSS growth
    reported: bool
    rss_before: int  # the worker's RSS before the load, with the copies in ``held``
    held: list[str]
    rss: int
    metadata: dict[str, Any]
    generate: bool  # the runtime has the generate hook
    stream: bool  # and the stream hook


@dataclass(frozen=True)
class Unloaded:
    rss: int


@dataclass(frozen=True)
class Preloaded:
    rss: int


@dataclass(frozen=True)
class WorkerStats:
    rss: int
    models: list[str]  # the keys of the copies it holds
    stats: dict[str, dict[str, float]]  # key -> the runtime's counters (Runtime.stats)
