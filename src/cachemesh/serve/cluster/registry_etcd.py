"""The model registry of cluster mode: declarations in etcd, shared by every node.

Each document is one key, ``P/models/{name}`` (``cluster/keys.py``), its value the
:class:`~.documents.ModelDoc` as JSON, without a lease: a declaration outlives every node.
A document's revision is the key's ``mod_revision``; a write names the revision it
expects (etcd's compare-and-put) and loses with RevisionConflictError (409) when another
node wrote first. A document identical to the one stored is not written again (the same
``--model`` declared by every node of a DaemonSet is one write, the first).

Reads never go to etcd: a watch keeps every node's copy of ``models/`` current
(``cluster/view.py``), so that :meth:`snapshot` and :meth:`get` answer from memory, also
while etcd is down. Writes run on the server's event loop (the registry's callers are in
threads, ``deployments.py``); while the node is degraded (etcd unreachable) they fail at
once with ClusterUnavailableError (503) rather than after a timeout.

The local copy, in the node's own store (written temp file, fsync, rename)::

    $CACHEMESH_HOME/cluster/models.json
        {"prefix": P, "epoch": "<etcd's epoch>",
         "models": {NAME: {"doc": {...} | null, "revision": N, "at": EPOCH_SECONDS}}}

It holds the last state this node saw, deletions included (``"doc": null``, kept so
that a model deleted before a loss is known as deleted). When etcd comes back empty (its
``epoch`` key changed or is missing: its data was lost, see ``cluster/membership.py``),
the node writes back the documents of its local copy, create-if-absent; every node does
the same, so the first to get there restores each one, and the others find it identical.
A node started on an empty etcd whose epoch differs from its local copy's restores too.
Known limit: a node that was down while a model was deleted, and comes back after etcd
lost its data, restores the model it still holds (its copy is older than the deletion).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ...cluster.identity import cluster_dir
from ...cluster.keys import Keys
from ...cluster.kv import KV, KeyValue, Snapshot
from ...cluster.view import Event, PrefixView
from ...errors import ClusterUnavailableError, RevisionConflictError
from ..core.documents import ModelDoc
from ..core.registry import Change, Entry, Listing, ModelRegistry

log = logging.getLogger("cachemesh.cluster")

# Seconds a write from a thread waits for the event loop's answer (EtcdKV's own timeout
# is shorter; this only guards against a loop that is gone).
_WRITE_WAIT_S = 30.0
# Deletions the local copy remembers at most (the oldest go first).
_TOMBSTONES = 10_000


class EtcdModelRegistry(ModelRegistry):
    """Documents in etcd under ``keys.models``; see the module docstring."""

    def __init__(self, kv: KV, keys: Keys, home: Path, *,
                 degraded: Callable[[], bool] = lambda: False) -> None:
        self.kv = kv
        self.keys = keys
        self.path = cluster_dir(home) / "models.json"
        self._degraded = degraded
        self._entries: dict[str, Entry] = {}
        self._view = PrefixView(kv, keys.models, on_event=self._seen, on_reset=self._reset)
        self._watchers: set[asyncio.Queue[Change]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local: dict[str, dict[str, Any]] = {}
        self._epoch: str | None = None
        self._save_pending = False
        self._opened = False
        self._save_lock = threading.Lock()
        self.restores = 0  # times this node wrote its local copy back into an empty etcd

    # -- start and stop -------------------------------------------------------------

    async def open(self) -> None:
        """Read ``models/`` and follow it (raises ClusterUnavailableError without etcd)."""
        self._loop = asyncio.get_running_loop()
        self._local = self._read_local()
        await self._view.load()
        epoch = await self._read_epoch()
        known = self._local_epoch
        if known is not None and known != epoch and not self._view.items:
            log.warning("etcd's epoch is %s, not %s as this node last saw it, and it holds no"
                        " model: restoring the declarations from %s", epoch, known, self.path)
            await self._restore()
            await self._view.load()
        self._epoch = epoch
        self._opened = True
        self._save()
        self._view.start()

    async def close(self) -> None:
        await self._view.stop()
        self._flush()

    # -- reads (from memory) ------------------------------------------------------

    def snapshot(self) -> Listing:
        entries = dict(self._entries)
        return Listing([entries[k] for k in sorted(entries)], self._view.revision)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    @property
    def errors(self) -> int:
        return self._view.errors

    # -- writes (on the event loop) -------------------------------------------------

    def put_if(self, doc: ModelDoc, *, revision: int) -> int:
        return self._run(self.put_doc(doc, revision=revision))

    def remove_if(self, name: str, *, revision: int | None = None) -> bool:
        return self._run(self.remove_doc(name, revision=revision))

    def _run(self, coro: Any) -> Any:
        loop = self._loop
        if loop is None:
            coro.close()
            raise ClusterUnavailableError("the cluster registry is not open yet")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("EtcdModelRegistry's sync writes run in a thread:"
                               " await put_doc/remove_doc on the event loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_WRITE_WAIT_S)

    def _check_writable(self) -> None:
        if self._degraded():
            raise ClusterUnavailableError(
                f"etcd ({self.kv.endpoints}) cannot be reached: declarations wait until it is"
                " back; this node goes on serving the models it has loaded")

    async def put_doc(self, doc: ModelDoc, *, revision: int) -> int:
        """Write ``doc`` if its key is at ``revision`` (0: absent); an identical document
        is not written again (its revision is returned, whatever ``revision`` said)."""
        self._check_writable()
        key = self.keys.model(doc.name)
        current = await self.kv.get(key)
        if current is not None and _same(current.value, doc):
            self._view.apply(current)
            return current.mod_revision
        actual = current.mod_revision if current is not None else 0
        if actual != revision:
            raise RevisionConflictError(f"model {doc.name!r}", revision, actual)
        value = doc.model_dump_json().encode()
        try:
            written = await self.kv.put_if(key, value, mod_revision=revision)
        except RevisionConflictError as exc:
            raise RevisionConflictError(f"model {doc.name!r}", revision, exc.actual) from None
        self._view.apply(KeyValue(key, value, create_revision=current.create_revision
                                  if current else written, mod_revision=written, version=0))
        return written

    async def remove_doc(self, name: str, *, revision: int | None = None) -> bool:
        self._check_writable()
        key = self.keys.model(name)
        try:
            deleted = await self.kv.delete(key, mod_revision=revision)
        except RevisionConflictError as exc:
            raise RevisionConflictError(f"model {name!r}", revision or 0, exc.actual) from None
        if deleted:
            self._view.apply(KeyValue(key, b"", 0, 0, 0), deleted=True)
        return deleted

    # -- changes --------------------------------------------------------------------

    def watch(self, *, start_revision: int) -> AsyncIterator[Change]:
        """Every change seen from now on (``start_revision`` is not replayed: take the
        snapshot and call this with no ``await`` between). After etcd lost its data the
        revisions start again low: compare documents, not revisions."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._watchers.add(queue)
        return self._follow(queue)

    async def _follow(self, queue: asyncio.Queue[Change]) -> AsyncIterator[Change]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    def _seen(self, event: Event) -> None:
        name = self.keys.name_of(event.key, self.keys.models)
        if event.deleted:
            self._entries.pop(name, None)
            change = Change("delete", name, None, event.kv.mod_revision)
            self._remember(name, None, event.kv.mod_revision)
        else:
            try:
                doc = ModelDoc.model_validate_json(event.kv.value)
            except ValidationError as exc:
                log.warning("ignoring the malformed model document at %s: %s", event.key, exc)
                return
            if doc.name != name:
                log.warning("ignoring %s: it holds the document of %r", event.key, doc.name)
                return
            self._entries[name] = Entry(doc, event.kv.mod_revision)
            change = Change("put", name, doc, event.kv.mod_revision)
            self._remember(name, doc, event.kv.mod_revision)
        for queue in list(self._watchers):
            queue.put_nowait(change)

    async def _reset(self, snapshot: Snapshot) -> Snapshot:
        """The watch could not resume: the prefix was read again. If etcd lost its data,
        write the local copy back first, so that no model looks deleted."""
        epoch = await self._read_epoch()
        if self._epoch is not None and epoch != self._epoch:
            log.warning("etcd lost its data (epoch %s, was %s): restoring the declarations"
                        " from %s", epoch, self._epoch, self.path)
            await self._restore()
            snapshot = await self.kv.get_prefix(self.keys.models)
        self._epoch = epoch
        self._save()
        return snapshot

    async def _read_epoch(self) -> str:
        """etcd's epoch, created if absent (as membership does: the first one wins)."""
        found = await self.kv.get(self.keys.epoch)
        if found is None:
            try:
                await self.kv.put_if(self.keys.epoch, uuid.uuid4().hex.encode(), mod_revision=0)
            except RevisionConflictError:
                pass
            found = await self.kv.get(self.keys.epoch)
        return found.value.decode() if found else ""

    async def _restore(self) -> None:
        self.restores += 1
        for name, item in sorted(self._local.items()):
            if item.get("doc") is None:
                continue  # deleted before the loss: stays deleted
            try:
                doc = ModelDoc.model_validate(item["doc"])
            except ValidationError as exc:
                log.warning("local copy of model %s is malformed, not restored: %s", name, exc)
                continue
            try:
                await self.kv.put_if(self.keys.model(name), doc.model_dump_json().encode(),
                                     mod_revision=0)
            except RevisionConflictError:
                pass  # another node restored it first

    # -- the local copy ----------------------------------------------------------------

    @property
    def _local_epoch(self) -> str | None:
        return getattr(self, "_file_epoch", None)

    def _read_local(self) -> dict[str, dict[str, Any]]:
        self._file_epoch = None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read the local copy of the declarations %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("prefix") != self.keys.prefix:
            return {}  # another cluster's (or no) copy
        self._file_epoch = data.get("epoch")
        models = data.get("models")
        return models if isinstance(models, dict) else {}

    def _remember(self, name: str, doc: ModelDoc | None, revision: int) -> None:
        self._local[name] = {"doc": doc.model_dump(mode="json") if doc else None,
                             "revision": revision, "at": time.time()}
        if doc is None:
            dead = [n for n, i in self._local.items() if i.get("doc") is None]
            for old in sorted(dead, key=lambda n: self._local[n]["at"])[:-_TOMBSTONES or None]:
                del self._local[old]
        self._save()

    def _save(self) -> None:
        """Write the local copy soon (several changes at once are one write)."""
        if self._save_pending or self._loop is None:
            return
        self._save_pending = True
        self._loop.call_later(0.05, self._flush)

    def _flush(self) -> None:
        self._save_pending = False
        if not self._opened:
            return  # a registry that never opened must not overwrite the copy
        data = {"prefix": self.keys.prefix, "epoch": self._epoch, "models": self._local}
        with self._save_lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(f".models.json.{os.getpid()}.tmp")
                # 0600: a source may carry a credential (a presigned URL), as in meta.db.
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                               "w") as f:
                    json.dump(data, f, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                self._file_epoch = self._epoch
            except OSError as exc:
                log.warning("cannot write the local copy of the declarations %s: %s",
                            self.path, exc)


def _same(value: bytes, doc: ModelDoc) -> bool:
    try:
        return ModelDoc.model_validate_json(value) == doc
    except ValidationError:
        return False
