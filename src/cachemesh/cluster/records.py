"""The schemas of the values cachemesh writes into etcd (see ``keys.py`` for where).

Values are JSON of these pydantic models. Unknown fields are kept out of the model but
accepted (``extra="ignore"``), so that a node of a later minor version can add a field
without breaking older readers; a change that older readers would misread goes under
a new prefix (``/cachemesh/v2/``) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .kv import KeyValue

log = logging.getLogger(__name__)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> _Record:
        return cls.model_validate_json(data)


class CopyState(_Record):
    """A model copy this node holds, as the node record summarises it."""

    model: str
    version: str | None = None
    state: Literal["loading", "ready", "draining"] = "ready"
    bytes: int = Field(default=0, ge=0, description="memory the copy takes")
    last_used: float = Field(default=0.0, description="epoch seconds of its last request")
    rate: float = Field(default=0.0, ge=0, description="requests per second, recent")


class DeviceMemory(_Record):
    """One accelerator of the node."""

    name: str
    total_bytes: int = Field(ge=0)
    used_bytes: int = Field(default=0, ge=0)


class NodeRecord(_Record):
    """``nodes/{name}``: one live node, bound to its lease; written only by that node."""

    name: str
    node_id: str = Field(description="the store's id: the same store restarted is the same node")
    advertise: str = Field(description="http(s)://ADDR:PORT where the other nodes reach it")
    http: str | None = Field(default=None, description="HOST:PORT of its HTTP listener")
    grpc: str | None = Field(default=None, description="HOST:PORT of its gRPC listener")
    labels: dict[str, str] = Field(default_factory=dict, description="e.g. zone")
    capacity_bytes: int | None = Field(default=None, ge=0, description="memory budget")
    memory_used_bytes: int = Field(default=0, ge=0)
    devices: list[DeviceMemory] = Field(default_factory=list)
    copies: list[CopyState] = Field(default_factory=list)
    draining: bool = False
    disk_free_bytes: int | None = Field(default=None, ge=0,
                                        description="free bytes where its store lives")
    cannot_load: dict[str, str] = Field(
        default_factory=dict, description="models this node cannot load, and why (a local"
        " source it lacks); placement skips it for them")
    prepared: dict[str, list[str]] = Field(
        default_factory=dict, description="model -> the version labels whose files are in"
        " this node's store (pulled): a hint placement prefers; a stale one costs a pull")
    version: str = Field(default="", description="cachemesh version of the node")
    started_at: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeRecord:
        return cls.model_validate_json(data)

    def has_files(self, model: str, version: str | None) -> bool:
        """Whether this node's store holds the files of ``model@version`` (the hint)."""
        return (version or "default") in self.prepared.get(model, ())


class Candidate(_Record):
    """``leader/{lease}``: one node standing in the leader election."""

    name: str
    node_id: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Candidate:
        return cls.model_validate_json(data)


R = TypeVar("R", bound=_Record)


def parse_each(kvs: Iterable[KeyValue], record: type[R], what: str) -> list[R]:
    """The values of a prefix read as ``record``; a malformed one is logged and skipped
    (a node of a later version, or a hand edit, must not stop the others reading)."""
    out = []
    for kv in kvs:
        try:
            out.append(record.model_validate_json(kv.value))
        except ValidationError:
            log.warning("ignoring a malformed %s at %s", what, kv.key)
    return out
