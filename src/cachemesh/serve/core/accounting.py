"""What a request and the service's state leave in ``/metrics``.

``Counted`` wraps one answered request of any protocol (V2, OpenAI, streams): the request
counters and latencies by outcome, and its version's tally (Triton's statistics).
``refresh_gauges`` sets the gauges from the state now, before each scrape. The label
children a model uses are looked up once and kept on its deployment and version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ...errors import (
    InvalidInputError,
    ModelFailedError,
    ModelNotFoundError,
    RequestTimeoutError,
    UnavailableError,
)
from .metrics import Metrics
from .state import Deployment, Series, Version

if TYPE_CHECKING:
    from ..cluster.cluster_mode import ClusterContext


def series_of(metrics: Metrics, dep: Deployment) -> Series:
    """The model's request series, looked up once."""
    name = dep.name
    dep.series = Series(metrics.inflight.labels(name), metrics.hits.labels(name),
                        metrics.misses.labels(name), metrics.requests.labels(name, "ok"),
                        metrics.latency.labels(name))
    return dep.series


def routed_of(metrics: Metrics, v: Version) -> Any:
    """The counter of requests routed to this version, looked up once."""
    v.routed = metrics.routed.labels(v.model, v.label)
    return v.routed


class Counted:
    """One answered request of any protocol in the request counters and latencies
    (a stream's latency is its whole length), and in its version's tally::

        with Counted(metrics, name, dep, v) as series:
            ...

    A class, not a generator context manager: it runs on every request, and this form
    costs a fraction of that one's enter and exit."""

    __slots__ = ("metrics", "name", "series", "started", "version")

    def __init__(self, metrics: Metrics, name: str, dep: Deployment, v: Version) -> None:
        self.metrics = metrics
        self.name = name
        self.version = v
        self.series = dep.series or series_of(metrics, dep)
        self.started = 0

    def __enter__(self) -> Series:
        self.started = time.perf_counter_ns()
        self.series.inflight.inc()
        return self.series

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        elapsed = time.perf_counter_ns() - self.started
        series = self.series
        series.inflight.dec()
        outcome = "ok" if kind is None else _outcome(kind)
        (series.ok if kind is None else self.metrics.requests.labels(self.name, outcome)).inc()
        series.latency.observe(elapsed / 1e9)
        if outcome != "cancelled":
            self.version.tally.answered(kind is None, elapsed)


def _outcome(kind: type[BaseException]) -> str:
    """The outcome label of a request that raised ``kind``."""
    if issubclass(kind, (InvalidInputError, ModelNotFoundError)):
        return "client_error"
    if issubclass(kind, RequestTimeoutError):
        return "timeout"
    if issubclass(kind, UnavailableError):
        return "unavailable"
    if issubclass(kind, ModelFailedError):
        return "failed"
    if issubclass(kind, (GeneratorExit, asyncio.CancelledError)):
        return "cancelled"  # the client went away
    return "error"


def refresh_gauges(metrics: Metrics, memory: dict[str, Any], versions: Iterable[Version],
                   cluster: ClusterContext | None) -> None:
    """The gauges from the state now: memory held, each worker's RSS, loaded models,
    ready copies of each version, and in a cluster the membership's counts."""
    metrics.held.set(memory["held_bytes"])
    for w in memory["workers"]:
        metrics.worker_rss.labels(str(w["id"])).set(w["rss_bytes"])
    versions = list(versions)
    metrics.loaded.set(sum(1 for v in versions if v.ready_copies()))
    for v in versions:
        metrics.copies.labels(v.model, v.label).set(len(v.ready_copies()))
    if cluster is not None:
        metrics.observe_cluster(cluster.membership.renewals, cluster.etcd_errors,
                                cluster.degraded)
