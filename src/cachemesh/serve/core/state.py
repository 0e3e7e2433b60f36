"""What the service holds in memory, and how it shows it.

::

    Deployment   a model name: its document (versions, traffic, routes), its router
      └─ Version   one version: its source, pulled view, runtime, state, counters
           └─ Copy   one load of that version on one slot, a worker ("name@label#n")

A version goes through::

    Pulling -> Unloaded -> Loading -> Ready -> Unloading -> Unloaded ...
                              |
                              +--> Failed (after ``load_attempts`` failed loads; expires)

Ready means at least one copy is ready. A version's first copy loads on demand
(or eagerly, or during a rollout); further copies are added and let go by the
copy scaler (``copies.py``). ``*Status`` are what the control API and
``cachemesh models ls`` show.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ...runtimes import Resolved
from ...sources.redact import redact_source
from .copies import CopyPolicy, RateMeter
from .documents import DEFAULT_VERSION, ModelDoc, VersionSpec, shown_version
from .loadqueue import Ticket
from .routing import Router
from .slot import Slot

PULLING, UNLOADED, LOADING, READY, UNLOADING, FAILED = (
    "Pulling", "Unloaded", "Loading", "Ready", "Unloading", "Failed")
# The reason an Unloaded version gives on a cluster node that has not pulled its files.
NOT_HERE = "not on this node; files are pulled when placed here"


@dataclass(slots=True)
class Series:
    """A model's metric series, looked up once."""

    inflight: Any
    hits: Any
    misses: Any
    ok: Any
    latency: Any


@dataclass(slots=True)
class Tally:
    """A version's answered requests, as Triton's statistics count them (gRPC
    ``ModelStatistics``): successes and failures with their summed durations, and
    the waits for a load."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    queued: int = 0
    queue_ns: int = 0
    last_ms: int = 0  # the last answer, ms since the epoch

    def answered(self, ok: bool, ns: int) -> None:
        if ok:
            self.success += 1
            self.success_ns += ns
        else:
            self.fail += 1
            self.fail_ns += ns
        self.last_ms = time.time_ns() // 1_000_000


@dataclass(eq=False)
class Copy:
    version: Version
    slot: Slot  # where it is loaded
    key: str
    state: str = LOADING  # LOADING, READY, UNLOADING
    size: int = 0
    inflight: int = 0
    picked: int = 0  # when a request last chose it (a tick)
    loaded_at: float = 0.0  # monotonic
    last_used: float = 0.0  # monotonic
    extra: bool = False  # added by the copy scaler
    placed: str = ""  # why it is on this slot (placement.place's reasons)
    unload_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY and self.slot.alive


@dataclass(eq=False)
class Version:
    model: str
    label: str
    spec: VersionSpec
    cache: str
    bucket: str  # of its cache (the model's); a protected one hides the model
    phase: str = PULLING  # PULLING, UNLOADED, LOADING or FAILED; READY/UNLOADING come from copies
    reason: str | None = None
    view: Path | None = None
    resolved: Resolved | None = None
    disk_bytes: int = 0
    predicted: int = 0
    # The worker that read this version's weights ahead (Preload): its first load goes
    # there when that worker has room, and adopts them.
    prefetched_on: int | None = None
    copies: list[Copy] = field(default_factory=list)
    inflight: int = 0
    # Requests waiting for a copy to become ready. While there are some, its ready
    # copies count them as in flight: a copy just loaded for them must not be evicted
    # (by a load whose turn comes first) before they wake up and take it.
    waiting: int = 0
    requests: int = 0  # answered, for the rate
    last_used: float = 0.0  # monotonic
    last_used_wall: float | None = None
    uses: float = 0.0  # recent uses, halving every USES_HALF_LIFE_S (the churn guard)
    loads: int = 0
    evictions: int = 0
    failed_until: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, bool] = field(default_factory=dict)
    prepare_task: asyncio.Task | None = None
    load_task: asyncio.Task | None = None
    copy_task: asyncio.Task | None = None
    ticket: list[Ticket | None] = field(default_factory=lambda: [None])
    hold: contextlib.ExitStack | None = None
    removed: bool = False
    meter: RateMeter = field(default_factory=RateMeter)
    rate: float = 0.0
    low_since: float | None = None
    scaling: str = ""  # the copy scaler's last word on it
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    routed: Any = None  # its cachemesh_version_requests_total series
    tally: Tally = field(default_factory=Tally)

    @property
    def id(self) -> str:
        return f"{self.model}@{self.label}"

    @property
    def display(self) -> str:
        return self.model if self.label == DEFAULT_VERSION else self.id

    def ready_copies(self) -> list[Copy]:
        return [c for c in self.copies if c.ready]

    def state(self, now: float) -> str:
        if any(c.ready for c in self.copies):
            return READY
        if self.phase == LOADING:
            return LOADING
        if any(c.state == UNLOADING for c in self.copies):
            return UNLOADING
        if self.phase == FAILED:
            return FAILED if now < self.failed_until else UNLOADED
        return self.phase

    def size(self) -> int:
        return max((c.size for c in self.copies if c.state == READY), default=0)

    def error(self, message: str) -> None:
        self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}"[:1000])

    def status(self, now: float) -> VersionStatus:
        copies = [CopyStatus(worker=c.slot.id, state=c.state, inflight=c.inflight,
                             size_bytes=c.size or None, last_used=wall(c.last_used, now),
                             extra=c.extra, placed=c.placed)
                  for c in self.copies if c.state in (READY, UNLOADING) and c.slot.alive]
        return VersionStatus(
            state=self.state(now), reason=self.reason,
            runtime=self.resolved.runtime if self.resolved else self.spec.runtime,
            copies=copies, size_bytes=self.size() or None,
            predicted_bytes=self.predicted or None, inflight=self.inflight, loads=self.loads,
            evictions=self.evictions, last_used=self.last_used_wall, rate=round(self.rate, 2),
            view=str(self.view) if self.view else None, scaling=self.scaling,
            errors=list(self.errors))


@dataclass(eq=False)
class Deployment:
    doc: ModelDoc
    origin: str  # "config": the command line or --config; "api": deployed at run time
    router: Router
    policy: CopyPolicy
    versions: dict[str, Version] = field(default_factory=dict)
    series: Series | None = None
    rollout: asyncio.Task | None = None
    rollout_note: str | None = None  # how the last rollout ended
    removed: bool = False
    revision: int = 0  # of its document in the registry (0: not there, from the command line)

    @property
    def name(self) -> str:
        return self.doc.name

    def is_ready(self, version: str | None = None) -> bool:
        """Whether ``version`` (a label or alias; else every version taking traffic)
        has a ready copy."""
        labels = ([self.router.choose(version).version] if version is not None
                  else self.doc.serving())
        return all(self.versions[label].ready_copies() for label in labels)

    def metadata(self, v: Version) -> dict[str, Any] | None:
        """V2 metadata of ``v``: what its load reported, else what its files say
        (``Runtime.describe``); None when only a load can tell. ``versions``: every
        version label of the model (``default`` for one that names none)."""
        meta = v.metadata or (v.resolved.metadata if v.resolved is not None else None)
        if not meta:
            return None
        return {
            "name": self.name,
            "versions": list(self.doc.versions),
            "platform": meta.get("platform") or (v.resolved.runtime if v.resolved else ""),
            "inputs": meta.get("inputs") or [],
            "outputs": meta.get("outputs") or [],
        }

    def status(self) -> ModelStatus:
        now = time.monotonic()
        # The document's order first; then versions a rollout is loading.
        order = [*self.doc.versions, *(x for x in self.versions if x not in self.doc.versions)]
        versions = {label: self.versions[label].status(now) for label in order
                    if label in self.versions}
        label = self.doc.primary()
        p, pv = self.versions[label], versions[label]
        workers = sorted({c.worker for v in versions.values() for c in v.copies})
        return ModelStatus(
            name=self.name, version=label, source=p.spec.source, runtime=pv.runtime,
            state=pv.state, reason=pv.reason, eager=self.doc.eager, origin=self.origin,
            bucket=self.doc.bucket,
            worker=pv.copies[0].worker if pv.copies else None, workers=workers,
            size_bytes=pv.size_bytes, predicted_bytes=pv.predicted_bytes,
            inflight=sum(v.inflight for v in versions.values()),
            loads=sum(v.loads for v in versions.values()),
            evictions=sum(v.evictions for v in versions.values()),
            last_used=max((v.last_used for v in versions.values() if v.last_used), default=None),
            view=pv.view, document=self.doc, versions=versions, rollout=self.rollout_note,
            revision=self.revision)


def versions_of(models: Mapping[str, Deployment]) -> list[Version]:
    """Every version of every deployment."""
    return [v for d in models.values() for v in d.versions.values()]


@dataclass
class CopyStatus:
    worker: int
    state: str
    inflight: int
    size_bytes: int | None
    last_used: float | None  # unix time
    extra: bool
    placed: str  # why this worker: the placement policy's reasons


@dataclass
class VersionStatus:
    state: str
    reason: str | None
    runtime: str | None  # the runtime serving it (named or detected)
    copies: list[CopyStatus]
    size_bytes: int | None  # measured size of one copy
    predicted_bytes: int | None
    inflight: int
    loads: int
    evictions: int
    last_used: float | None
    rate: float  # requests/s over the last few seconds
    view: str | None
    scaling: str
    errors: list[str]


@dataclass
class ModelStatus:
    """A model: its document and the state of each version.

    The flat fields (``state``, ``worker``, ``size_bytes``...) describe the
    *primary* version (the one with the largest share of traffic), as they did
    when a model had one version; ``versions`` has every version in detail.
    """

    name: str
    version: str | None
    source: str
    runtime: str | None
    state: str
    reason: str | None
    eager: bool
    origin: str
    bucket: str  # of its caches; a protected bucket hides the model from callers without its token
    worker: int | None
    workers: list[int]
    size_bytes: int | None
    predicted_bytes: int | None
    inflight: int
    loads: int
    evictions: int
    last_used: float | None
    view: str | None
    document: ModelDoc
    versions: dict[str, VersionStatus]
    rollout: str | None
    # The document's revision in the registry (0: declared at start, never written): the
    # ETag that a PUT's If-Match names.
    revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        doc = self.document.to_json()
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("document", "versions")}
        out["source"] = redact_source(self.source)
        out["versions"] = {label: {**shown_version(spec), "status": asdict(self.versions[label])}
                           for label, spec in doc["versions"].items()}
        for key in ("traffic", "routes", "aliases", "scaling"):
            out[key] = doc[key]
        return out


def wall(monotonic: float, now: float | None = None) -> float | None:
    """A monotonic instant as unix time."""
    if not monotonic:
        return None
    return time.time() - ((now if now is not None else time.monotonic()) - monotonic)
