"""What models the server serves: their specs, and where they are kept.

A :class:`ModelSpec` is the simple form a user declares (``--model``,
``POST /api/v1/models``, the V2 repository extension): one source, one
version. A :class:`~.documents.ModelDoc` is the full form (versions, traffic,
routes; ``PUT /api/v1/models/{name}``); a spec is a document with one version.

A :class:`ModelRegistry` keeps the documents deployed at run time, so they
survive a restart; the single-node default keeps them in the store's
``meta.db`` (table ``models``, see ``store/db.py``: its ``spec`` column holds
the document as JSON; rows written before documents existed hold a spec, read
as its one-version document). Models given on the command line are not written
there: the command declares them each time; a document deployed at run time
under the same name takes their place.

A registry has etcd's model, so that cluster mode can put etcd behind the same
methods (``cluster/kv.py``: ``models/{name}`` under the cluster's prefix): every
write gets a *revision*, greater than every revision before it; a document's
revision is that of its last write. A write says which revision it expects
(:meth:`ModelRegistry.put_if`; 0: the name is free) and loses with
:class:`~cachemesh.errors.RevisionConflictError` (409) when another write came
first. :meth:`ModelRegistry.watch` follows the changes from a revision on, as
etcd's watch does: take a :meth:`~ModelRegistry.snapshot`, then watch from its
revision + 1.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import HistoryLostError, InvalidInputError, RevisionConflictError
from .documents import (
    DEFAULT_BUCKET,
    BucketName,
    ModelDoc,
    ModelName,
    Parameters,
    Scaling,
    SourceText,
    doc_from_spec,
    make_document,
)

__all__ = ["DEFAULT_BUCKET", "Change", "Entry", "Listing", "ModelRegistry", "ModelSpec",
           "make_model_spec", "read_config"]


class ModelSpec(BaseModel):
    """A model to serve: where its files come from and how to run them."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    source: SourceText = Field(
        description="anything `cachemesh pull` takes: a path, file://, s3://, hf://")
    runtime: str | None = Field(default=None, description="sklearn, custom, ...; detected if absent")
    version: str | None = None
    parameters: Parameters = Field(default_factory=dict,
                                   description="runtime options, e.g. class, trusted")
    eager: bool = Field(default=False, description="load at start instead of on the first request")
    scaling: Scaling = Field(default_factory=Scaling,
                             description="extra copies: copy_rate, max_copies, cooldown_s")
    bucket: BucketName = Field(default=DEFAULT_BUCKET,
                        description="bucket of the model's cache; when it is protected, the model"
                        " is seen and called only with the bucket's token")


def make_model_spec(data: dict[str, Any]) -> ModelSpec:
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "model"
            problems.append(f"{where}: {err.get('ctx', {}).get('error') or err['msg']}")
        raise InvalidInputError("invalid model spec: " + "; ".join(problems)) from None


_TRUE = {"1", "true", "yes", "on"}


def parse_model_option(text: str) -> ModelSpec:
    """``NAME=SOURCE[,runtime=R][,version=V][,bucket=B][,eager=true][,copy_rate=N]
    [,max_copies=N][,cooldown_s=S][,KEY=VALUE...]``.

    Other keys are runtime parameters. A source containing ',' or '=' is given
    through ``--config`` instead.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise InvalidInputError(f"--model expects NAME=SOURCE[,runtime=R][,version=V], got {text!r}")
    source, *options = rest.split(",")
    data: dict[str, Any] = {"name": name.strip(), "source": source, "parameters": {}}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInputError(
                f"--model {name}: option {option!r} is not KEY=VALUE (a source with ',' or '='"
                " goes in --config)")
        if key in ("runtime", "version", "bucket"):
            data[key] = value
        elif key == "eager":
            data["eager"] = value.strip().lower() in _TRUE
        elif key in Scaling.model_fields:
            data.setdefault("scaling", {})[key] = value
        else:
            data["parameters"][key] = value
    return make_model_spec(data)


def read_config(path: Path) -> list[ModelSpec | ModelDoc]:
    """A YAML (or JSON) file: a list of models, or ``{"models": [...]}``; each is a
    spec (``name``, ``source``, ...) or a document (``name``, ``versions``, ...)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"cannot read model config {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("models")
    if not isinstance(data, list):
        raise InvalidInputError(f"{path}: expected a list of models, or a mapping with 'models:'")
    models: list[ModelSpec | ModelDoc] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidInputError(f"{path}: model #{i + 1} is not a mapping")
        models.append(make_document(item) if "versions" in item else make_model_spec(item))
    return models


@dataclass(frozen=True)
class Entry:
    """A document as the registry holds it, and the revision of its last write."""

    doc: ModelDoc
    revision: int


class Listing(NamedTuple):
    """Every document, in name order, and the registry's revision when they were read."""

    entries: list[Entry]
    revision: int


@dataclass(frozen=True)
class Change:
    """A document written (``put``) or removed (``delete``: ``doc`` is None) at ``revision``."""

    kind: Literal["put", "delete"]
    name: str
    doc: ModelDoc | None
    revision: int


class ModelRegistry(ABC):
    """Where run-time deployments are kept (see the module docstring for revisions).

    The methods other than :meth:`watch` may block (a database, a network): the
    service calls them off its event loop, in a thread.
    """

    @abstractmethod
    def snapshot(self) -> Listing:
        """Every document, with its revision, and the registry's revision."""

    @abstractmethod
    def get(self, name: str) -> Entry | None:
        """The document of ``name``, or None."""

    @abstractmethod
    def put_if(self, doc: ModelDoc, *, revision: int) -> int:
        """Write ``doc`` if its name is at ``revision`` (0: absent); return the revision
        of the write, or raise RevisionConflictError with the revision found."""

    @abstractmethod
    def remove_if(self, name: str, *, revision: int | None = None) -> bool:
        """Remove ``name`` (only if at ``revision``, when given: else RevisionConflictError);
        False if it was absent."""

    @abstractmethod
    def watch(self, *, start_revision: int) -> AsyncIterator[Change]:
        """The changes from ``start_revision`` on, in revision order, for as long as the
        caller iterates; HistoryLostError when they are no longer known (read a
        snapshot again). Close the iterator (``contextlib.aclosing``) to stop."""

    def list(self) -> list[ModelDoc]:
        return [e.doc for e in self.snapshot().entries]

    def put(self, doc: ModelDoc) -> int:
        """Write ``doc`` whatever is there (the last writer wins)."""
        while True:
            found = self.get(doc.name)
            try:
                return self.put_if(doc, revision=found.revision if found else 0)
            except RevisionConflictError:
                continue  # written meanwhile: write over that

    def remove(self, name: str) -> None:
        self.remove_if(name)


class _Changes:
    """The changes a registry of this process made, kept for :meth:`ModelRegistry.watch`:
    the last ``keep`` of them, and the watchers to tell (each in its own event loop;
    writers run in threads)."""

    def __init__(self, revision: int, keep: int = 1000) -> None:
        self._log: deque[Change] = deque(maxlen=keep)
        self._known_from = revision + 1  # the first revision a watch can start at
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]] = set()
        self._lock = threading.Lock()

    def publish(self, change: Change) -> None:
        with self._lock:  # held while telling: every watcher sees changes in order
            if len(self._log) == self._log.maxlen:
                self._known_from = self._log[0].revision + 1
            self._log.append(change)
            for loop, queue in list(self._watchers):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, change)
                except RuntimeError:  # its event loop is gone, and the watch with it
                    self._watchers.discard((loop, queue))

    async def watch(self, start_revision: int) -> AsyncIterator[Change]:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        watcher = (asyncio.get_running_loop(), queue)
        with self._lock:
            if start_revision < self._known_from:
                raise HistoryLostError(
                    f"the model registry keeps changes from revision {self._known_from} on,"
                    f" not {start_revision}: read it again", self._known_from)
            backlog = [c for c in self._log if c.revision >= start_revision]
            self._watchers.add(watcher)
        try:
            for change in backlog:
                yield change
            last = backlog[-1].revision if backlog else 0
            while True:
                change = await queue.get()
                if change.revision > last:  # (one told while the backlog was read)
                    last = change.revision
                    yield change
        finally:
            with self._lock:
                self._watchers.discard(watcher)


class MemoryModelRegistry(ModelRegistry):
    """Forgets everything at exit: for tests and for servers that want no state."""

    def __init__(self) -> None:
        self._docs: dict[str, Entry] = {}
        self._revision = 0
        self._lock = threading.Lock()
        self._changes = _Changes(0)

    def snapshot(self) -> Listing:
        with self._lock:
            return Listing([self._docs[k] for k in sorted(self._docs)], self._revision)

    def get(self, name: str) -> Entry | None:
        return self._docs.get(name)

    def put_if(self, doc: ModelDoc, *, revision: int) -> int:
        with self._lock:
            _expect(doc.name, revision, self._docs.get(doc.name))
            self._revision += 1
            self._docs[doc.name] = Entry(doc, self._revision)
            self._changes.publish(Change("put", doc.name, doc, self._revision))
            return self._revision

    def remove_if(self, name: str, *, revision: int | None = None) -> bool:
        with self._lock:
            found = self._docs.get(name)
            if revision is not None:
                _expect(name, revision, found)
            if found is None:
                return False
            del self._docs[name]
            self._revision += 1
            self._changes.publish(Change("delete", name, None, self._revision))
            return True

    def watch(self, *, start_revision: int) -> AsyncIterator[Change]:
        return self._changes.watch(start_revision)


class SqliteModelRegistry(ModelRegistry):
    """The ``models`` table of the store's meta.db.

    A document's revision is the time of its write in microseconds, kept in the
    row's ``updated_at`` (seconds, as before): the schema stays as it is, and
    revisions keep growing across restarts. A write takes the later of now and
    the last revision seen + 1, so that two writes in one microsecond, or a clock
    set back, still get increasing revisions. ``watch`` knows the changes this
    process made (the server is the one writer of its store's registry; the CLI
    goes through the control API), from the revision the table was at when opened.
    """

    def __init__(self, db: Any) -> None:
        self.db = db
        rows = self.db.query("SELECT MAX(updated_at) AS last FROM models")
        self._last = _revision_of(rows[0]["last"] or 0) if rows else 0
        self._changes = _Changes(self._last)
        # This process's writes one at a time: each is told to watchers in its order.
        self._lock = threading.Lock()

    def snapshot(self) -> Listing:
        with self._lock:  # the rows and the revision agree
            rows = self.db.query("SELECT spec, updated_at FROM models ORDER BY name")
            revision = self._last
        return Listing([_entry(r) for r in rows], revision)

    def get(self, name: str) -> Entry | None:
        rows = self.db.query("SELECT spec, updated_at FROM models WHERE name = ?", (name,))
        return _entry(rows[0]) if rows else None

    def put_if(self, doc: ModelDoc, *, revision: int) -> int:
        with self._lock:
            with self.db.transaction() as conn:
                new = self._write(conn, doc.name, revision)
                conn.execute(
                    "INSERT INTO models (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,"
                    " updated_at = excluded.updated_at",
                    (doc.name, doc.model_dump_json(), time.time(), new / 1_000_000))
            self._last = new
            self._changes.publish(Change("put", doc.name, doc, new))
        return new

    def remove_if(self, name: str, *, revision: int | None = None) -> bool:
        with self._lock:
            with self.db.transaction() as conn:
                new = self._write(conn, name, revision)
                if not conn.execute("DELETE FROM models WHERE name = ?", (name,)).rowcount:
                    return False
            self._last = new
            self._changes.publish(Change("delete", name, None, new))
        return True

    def _write(self, conn: Any, name: str, revision: int | None) -> int:
        """In a write transaction: check that ``name`` is at ``revision`` (None: any),
        and return the revision of this write."""
        if revision is not None:
            row = conn.execute("SELECT updated_at FROM models WHERE name = ?",
                               (name,)).fetchone()
            _expect_revision(name, revision, _revision_of(row[0]) if row else 0)
        (last,) = conn.execute("SELECT MAX(updated_at) FROM models").fetchone()
        return max(time.time_ns() // 1000, _revision_of(last or 0) + 1, self._last + 1)

    def watch(self, *, start_revision: int) -> AsyncIterator[Change]:
        return self._changes.watch(start_revision)


def _expect(name: str, revision: int, found: Entry | None) -> None:
    """Raise RevisionConflictError unless ``name`` is at ``revision`` (0: absent)."""
    _expect_revision(name, revision, found.revision if found is not None else 0)


def _expect_revision(name: str, revision: int, actual: int) -> None:
    if actual != revision:
        raise RevisionConflictError(f"model {name!r}", revision, actual)


def _revision_of(updated_at: float) -> int:
    return round(updated_at * 1_000_000)


def _entry(row: Any) -> Entry:
    """A row of ``models`` (spec, updated_at) as the registry's entry."""
    data = json.loads(row[0])
    doc = (ModelDoc.model_validate(data) if "versions" in data
           else doc_from_spec(ModelSpec.model_validate(data)))
    return Entry(doc, _revision_of(row[1]))
