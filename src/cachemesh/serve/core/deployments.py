"""Declarations: models declared, rolled out, retired and removed, and their checks.

A model is a document (``documents.py``): versions, traffic shares, routes.
:class:`Deployments` holds one :class:`~.state.Deployment` per name and keeps the
documents deployed at run time in the registry (``registry.py``), so that they
survive a restart; models given on the command line are declared at each start.

- Deploy (:meth:`Deployments.deploy`, the simple form) and apply (a document):
  everything that would fail later is refused first (a source nobody understands,
  400; a changed version or a cache holding something else, 409; a protected
  bucket without its token, 403), then the document is written and each version's
  pull starts in the background (``Loader.prepare``). In cluster mode
  (``pull_on_declare`` False) a node pulls a version only when it is to load it (placed
  here, a request loads it here, or ``eager``: every node), so that a declaration costs
  the cluster no pull and a node's disk holds what it serves; a version whose files
  are already in this node's store (an earlier pull) is prepared at once, with no
  download, so that the node record's ``prepared`` says so.
- Roll out (:meth:`Deployments.apply` on a known model): the versions the new
  document sends traffic to are loaded first; then the switch, one assignment (no
  request sees half a document); then the versions it dropped are retired: the
  requests routed to them finish, their copies are unloaded. A version that fails
  to load never takes traffic.
- One declaration per name at a time: the checks and registry writes run in
  threads, off the event loop, so two of them could otherwise interleave.
- Every registry write names the revision of the document it replaces
  (``Deployment.revision``; 0: none), so that a registry shared by several holders
  refuses a write based on a document another one changed meanwhile (409).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...access import can_use
from ...errors import (
    CachemeshError,
    CacheNotFoundError,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    RevisionConflictError,
)
from .copies import CopyPolicy
from .documents import ModelDoc, VersionSpec, cache_name, doc_from_spec, unredact
from .loading import Loader
from .loadqueue import BACKGROUND
from .prepare import check_cache
from .registry import ModelRegistry, ModelSpec
from .routing import Router
from .shared import Shared
from .state import NOT_HERE, UNLOADED, Deployment, Version, versions_of

log = logging.getLogger("cachemesh.serve")


class Deployments:
    """The models this server serves, by name."""

    def __init__(self, shared: Shared, registry: ModelRegistry, loader: Loader,
                 by_name: dict[str, Deployment], *, pull_on_declare: bool = True) -> None:
        """``by_name``: the deployments, shared with the loader (which only reads it).
        ``pull_on_declare``: pull every version when declared (a lone node); False in
        cluster mode, where a node pulls what it is to load."""
        self.pull_on_declare = pull_on_declare
        self.shared = shared
        self.cfg = shared.cfg
        self.registry = registry
        self.loader = loader
        self.by_name = by_name
        self._declaring: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    def versions(self) -> list[Version]:
        return versions_of(self.by_name)

    def restore(self, specs: Sequence[ModelSpec | ModelDoc]) -> list[Version]:
        """Declare the models given at start and those the registry kept; a document
        deployed at run time wins over one of the same name given at start. Returns
        the versions to load at once (eager ones)."""
        saved = {e.doc.name: e for e in self.registry.snapshot().entries}
        for item in specs:
            doc = item if isinstance(item, ModelDoc) else doc_from_spec(item)
            if doc.name in saved:
                if saved[doc.name].doc != doc:
                    log.warning("model %s: serving the document deployed at run time, not the"
                                " one given at start (DELETE it to go back)", doc.name)
                continue
            self.add(doc, origin="config")
        for entry in saved.values():
            self.add(entry.doc, origin="api", revision=entry.revision)
        return [v for d in self.by_name.values() if d.doc.eager
                for label, v in d.versions.items() if label in d.doc.serving()]

    def add(self, doc: ModelDoc, origin: str, revision: int = 0) -> Deployment:
        dep = Deployment(doc=doc, origin=origin, router=Router(doc),
                         policy=CopyPolicy.of(self.cfg, doc.scaling), revision=revision)
        for label, spec in doc.versions.items():
            dep.versions[label] = self._new_version(doc, label, spec)
        self.by_name[doc.name] = dep
        return dep

    def _new_version(self, doc: ModelDoc, label: str, spec: VersionSpec) -> Version:
        v = Version(model=doc.name, label=label, spec=spec, cache=cache_name(doc.name, label),
                    bucket=doc.bucket)
        if self.pull_on_declare:
            v.prepare_task = self.shared.background.start(self.loader.prepare(v))
        else:
            v.phase, v.reason = UNLOADED, NOT_HERE
            v.prepare_task = self.shared.background.start(self.loader.prepare_if_present(v))
        return v

    def _check_sources(self, doc: ModelDoc, known: Mapping[str, Version], *,
                       persist: bool = True) -> None:
        """Refuse, before anything changes, what would fail later: a source nobody
        understands (400), a changed version (409), a cache holding something else (409)."""
        from ...sources import parse_source

        # Over the API: local paths only from the roots (none by default); from the
        # command line (persist=False) the operator typed it.
        roots = tuple(self.cfg.source_roots) if persist else None
        for label, spec in doc.versions.items():
            old = known.get(label)
            if old is not None:
                if old.spec != spec:
                    raise ConflictError(
                        f"model {doc.name!r} version {label!r} exists with another source,"
                        " runtime or parameters; versions do not change: publish the change"
                        " under a new version label")
                continue  # checked when it came (a --model one is outside the roots)
            # An unknown scheme, a path into the store, or one outside the deployable
            # roots fails here, as 400, before anything is kept.
            source = parse_source(spec.source, {}, self.shared.settings)
            self.shared.caches.check_source(source, doc.bucket, roots)
            _check_exists(source, persist)
            base = (spec.parameters or {}).get("base")
            if isinstance(base, str) and base.strip():
                # An adapter's base model (runtimes/adapters.py) is pulled by the worker:
                # a source like any other, under the same rules.
                base_source = parse_source(base, {}, self.shared.settings)
                self.shared.caches.check_source(base_source, doc.bucket, roots)
                _check_exists(base_source, persist)
            try:
                info = self.shared.caches.get(cache_name(doc.name, label))
            except CacheNotFoundError:
                continue
            check_cache(info, doc.bucket, source, f"model {doc.name!r} version {label!r}",
                        "use another label", self.shared.caches.buckets.is_protected)

    def _check_access(self, doc: ModelDoc, existing: Deployment | None) -> None:
        """The caller must hold the token of the document's bucket (403), and may not
        touch a model it cannot see (409: the name is taken, nothing more is said)."""
        if not can_use(self.shared.caches.buckets, doc.bucket):
            raise ForbiddenError(f"bucket {doc.bucket!r} is protected; the request does not"
                                 " carry its token")
        if existing is not None and not existing.removed and not self.visible(existing):
            raise ConflictError(f"the name {doc.name!r} is taken")

    def _name_lock(self, name: str) -> asyncio.Lock:
        lock = self._declaring.get(name)
        if lock is None:
            lock = self._declaring[name] = asyncio.Lock()
        return lock

    async def deploy(self, spec: ModelSpec, *, persist: bool = True) -> None:
        """Add a model in its simple form (``POST /api/v1/models``), kept in the
        registry so it survives a restart. Its pull runs in the background.

        The checks and the registry write touch meta.db, so they run in a thread: a
        database locked by another process delays this declaration, not every request."""
        doc = doc_from_spec(spec)
        async with self._name_lock(spec.name):
            existing = self.by_name.get(spec.name)
            await asyncio.to_thread(self._check_access, doc, existing)
            if existing is not None and not existing.removed:
                if unredact(doc, existing.doc) == existing.doc:
                    return
                raise ConflictError(f"model {spec.name!r} exists with another spec; remove it"
                                    " first, or PUT /api/v1/models/{name} to roll out a new"
                                    " version")
            await asyncio.to_thread(self._check_sources, doc, {}, persist=persist)
            revision = (await asyncio.to_thread(self.registry.put_if, doc, revision=0)
                        if persist else 0)
            dep = self.add(doc, origin="api" if persist else "config", revision=revision)
        self.eager(dep)

    def eager(self, dep: Deployment) -> None:
        if dep.doc.eager:
            for label in dep.doc.serving():
                self.shared.background.start(self.loader.load_quietly(dep.versions[label]))

    async def apply(self, doc: ModelDoc, *, if_match: int | None = None) -> bool:
        """Make ``doc`` the model's document (``PUT /api/v1/models/{name}``); True if new.

        A new model is declared as :meth:`deploy` does. For an existing one this is a
        rollout: the versions the document sends traffic to are loaded first; only
        when all are ready does the document take effect (at once, for every request
        that starts after); then versions it no longer lists finish the requests they
        have and are unloaded. If a version fails to load, the old document stays and
        the error is raised. One rollout per model at a time (409 otherwise).

        ``if_match``: the revision the caller read (HTTP ``If-Match``; 0: the model must be
        new); another one is 409 (RevisionConflictError), whatever the document.
        """
        async with self._name_lock(doc.name):
            dep = self.by_name.get(doc.name)
            await asyncio.to_thread(self._check_access, doc, dep)
            if if_match is not None:
                found = dep.revision if dep is not None and not dep.removed else 0
                if found != if_match:
                    raise RevisionConflictError(f"model {doc.name!r}", if_match, found)
            if dep is None or dep.removed:
                await asyncio.to_thread(self._check_sources, doc, {})
                revision = await asyncio.to_thread(self.registry.put_if, doc, revision=0)
                self.eager(self.add(doc, origin="api", revision=revision))
                return True
            doc = unredact(doc, dep.doc)  # a source as GET showed it means the real one
            if dep.rollout is not None:
                raise ConflictError(f"model {doc.name!r} is being rolled out already; try"
                                    " again when that finishes")
            if doc.bucket != dep.doc.bucket:
                raise ConflictError(
                    f"model {doc.name!r} is in bucket {dep.doc.bucket!r}; a model's bucket"
                    " does not change: remove the model and deploy it again")
            await asyncio.to_thread(self._check_sources, doc, dep.versions)
            if dep.doc == doc:
                return False
            # The registry write names the revision this rollout started from: a change
            # another node made meanwhile makes it lose (409), not be overwritten.
            dep.rollout = task = self.shared.background.start(
                self._rollout(dep, doc, dep.revision))
        await asyncio.shield(task)  # the rollout goes on if the client gives up
        return False

    async def _rollout(self, dep: Deployment, doc: ModelDoc, base: int) -> None:
        try:
            await self._roll(dep, doc, base)
        except asyncio.CancelledError:
            if dep.removed:  # DELETE cancelled it
                raise ModelNotFoundError(doc.name) from None
            raise
        finally:
            dep.rollout = None

    async def _roll(self, dep: Deployment, doc: ModelDoc, base: int) -> None:
        old = dep.doc
        added = {label: self._new_version(doc, label, spec)
                 for label, spec in doc.versions.items() if label not in dep.versions}
        dep.versions.update(added)  # visible in status; requests reach them only after the switch
        dep.rollout_note = f"rolling out: loading {', '.join(doc.serving())} ({_shares(doc)})"
        log.info("model %s: %s", doc.name, dep.rollout_note)
        try:
            wanted = [dep.versions[label] for label in doc.serving()]
            # The deadline bounds waiting for room, not the loads themselves.
            deadline = time.monotonic() + self.cfg.request_timeout_s
            results = await asyncio.gather(
                *(self.loader.ensure_loaded(v, BACKGROUND, deadline) for v in wanted),
                return_exceptions=True)
            failed = [(v, r) for v, r in zip(wanted, results, strict=True)
                      if isinstance(r, BaseException)]
            if failed:
                v, exc = failed[0]
                raise exc if not isinstance(exc, ModelLoadError) else ModelLoadError(
                    f"rollout of model {doc.name!r} failed, traffic stays as it was"
                    f" ({_shares(old)}): {exc}")
            async with self._name_lock(doc.name):  # a DELETE writes the registry too
                if dep.removed:
                    raise ModelNotFoundError(doc.name)
                revision = await asyncio.to_thread(self.registry.put_if, doc, revision=base)
        except BaseException as exc:
            text = str(exc)
            dep.rollout_note = (text if text.startswith("rollout") else
                                f"rollout failed: {text or type(exc).__name__}")[:2000]
            for label, v in added.items():
                if label in dep.doc.versions and dep.versions.get(label) is v:
                    continue  # the document another node wrote meanwhile uses it (follow)
                if dep.versions.get(label) is v:
                    del dep.versions[label]
                self.shared.background.start(self.retire(v, "its rollout failed"))
            raise
        # The switch: one assignment each, no await in between.
        dep.doc, dep.router, dep.origin, dep.revision = doc, Router(doc), "api", revision
        dep.policy = CopyPolicy.of(self.cfg, doc.scaling)
        dropped = [dep.versions.pop(label) for label in list(dep.versions)
                   if label not in doc.versions]
        note = f"rolled out {time.strftime('%Y-%m-%dT%H:%M:%S')}: {_shares(doc)}"
        gone = ", ".join(v.label for v in dropped)
        dep.rollout_note = note + (f"; unloading {gone}" if dropped else "")
        log.info("model %s: %s", doc.name, dep.rollout_note)
        await asyncio.gather(*(self.retire(v, "dropped by a rollout") for v in dropped))
        if dropped:
            dep.rollout_note = f"{note}; unloaded {gone}"

    async def retire(self, v: Version, reason: str) -> None:
        """Forget a version that no new request can reach: the requests routed to it
        before finish on it (loading it if they must), then its copies are unloaded."""
        v.removed = True
        while v.inflight:
            await self.loader.pool.changed()
        for task in (v.load_task, v.copy_task):
            if task is not None:
                with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                    await asyncio.shield(task)
        await asyncio.gather(*(asyncio.shield(self.loader.start_unload(c, reason))
                               for c in list(v.copies)))
        if v.prepare_task is not None:
            v.prepare_task.cancel()
        self.loader.release_hold(v)
        with contextlib.suppress(KeyError):
            self.shared.metrics.copies.remove(v.model, v.label)

    async def remove(self, name: str) -> None:
        async with self._name_lock(name):
            dep = self.get(name)
            # (Revision 0: declared at start, never written; whatever is there goes.)
            await asyncio.to_thread(self.registry.remove_if, name, revision=dep.revision or None)
            dep.removed = True
        await self._forget(name, dep)

    async def _forget(self, name: str, dep: Deployment) -> None:
        """Retire a removed deployment's versions and let it go."""
        if dep.rollout is not None:
            rollout = dep.rollout
            rollout.cancel()
            with contextlib.suppress(CachemeshError, asyncio.CancelledError):
                await rollout
        await asyncio.gather(*(self.retire(v, "removed") for v in list(dep.versions.values())))
        if self.by_name.get(name) is dep:
            del self.by_name[name]
        with contextlib.suppress(KeyError):
            self.shared.metrics.model_bytes.remove(name)

    async def follow(self, name: str, doc: ModelDoc | None, revision: int) -> None:
        """Apply a change of the shared registry that another node made (cluster mode):
        a new model is declared here, a changed document takes effect (its new versions
        load on demand here), a removed model goes. Nothing is written back. A change
        this node made itself finds its document in place and only notes the revision."""
        async with self._name_lock(name):
            dep = self.by_name.get(name)
            live = dep is not None and not dep.removed
            if doc is None:
                if not live:
                    return
                assert dep is not None
                dep.removed = True
            elif not live:
                self.eager(self.add(doc, origin="api", revision=revision))
                return
            else:
                assert dep is not None
                if dep.doc == doc:
                    dep.revision = revision
                    return
                dropped = self._switch(dep, doc, revision)
        if doc is None:
            assert dep is not None
            log.info("model %s: removed by another node", name)
            await self._forget(name, dep)
            return
        log.info("model %s: document changed by another node (%s)", name, _shares(doc))
        await asyncio.gather(*(self.retire(v, "dropped by a rollout") for v in dropped))

    def _switch(self, dep: Deployment, doc: ModelDoc, revision: int) -> list[Version]:
        """Make ``doc`` the deployment's document at once; returns the versions it drops."""
        for label, spec in doc.versions.items():
            old = dep.versions.get(label)
            if old is None or old.spec != spec:
                if old is not None:
                    self.shared.background.start(self.retire(old, "replaced"))
                dep.versions[label] = self._new_version(doc, label, spec)
        dep.doc, dep.router, dep.origin, dep.revision = doc, Router(doc), "api", revision
        dep.policy = CopyPolicy.of(self.cfg, doc.scaling)
        return [dep.versions.pop(label) for label in list(dep.versions)
                if label not in doc.versions]

    def visible(self, dep: Deployment) -> bool:
        """Whether the caller of the current request may see the model (access.py)."""
        return can_use(self.shared.caches.buckets, dep.doc.bucket)

    def get(self, name: str, version: str | None = None) -> Deployment:
        dep = self.by_name.get(name)
        if dep is None or dep.removed or not self.visible(dep):
            raise ModelNotFoundError(name, version)
        return dep


def _check_exists(source: Any, persist: bool) -> None:
    """A local path given over the API that is not there is the request's fault, said at
    once (400), not a pull that fails later (the command line's --model keeps its old
    way: a mount may come after the server)."""
    root = getattr(source, "root", None)
    if persist and isinstance(root, Path) and not root.exists():
        raise InvalidInputError(f"local source {root} does not exist on this server")


def _shares(doc: ModelDoc) -> str:
    return ", ".join(f"{v} {p}%" for v, p in doc.traffic.items() if p) or "routes only"
