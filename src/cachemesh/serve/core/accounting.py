"""What a request and the service's state leave in ``/metrics``.

``counted`` wraps one answered request of any protocol (V2, OpenAI, streams): the request
counters and latencies by outcome, and its version's tally (Triton's statistics).
``refresh_gauges`` sets the gauges from the state now, before each scrape. The label
children a model uses are looked up once and kept on its deployment and version.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def counted(metrics: Metrics, name: str, dep: Deployment, v: Version) -> Iterator[Series]:
    """One answered request of any protocol in the request counters and latencies
    (a stream's latency is its whole length), and in its version's tally."""
    started = time.perf_counter_ns()
    series = dep.series or series_of(metrics, dep)
    series.inflight.inc()
    outcome = "error"
    try:
        yield series
        outcome = "ok"
    except (InvalidInputError, ModelNotFoundError):
        outcome = "client_error"
        raise
    except RequestTimeoutError:
        outcome = "timeout"
        raise
    except UnavailableError:
        outcome = "unavailable"
        raise
    except ModelFailedError:
        outcome = "failed"
        raise
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "cancelled"  # the client went away
        raise
    finally:
        elapsed = time.perf_counter_ns() - started
        series.inflight.dec()
        (series.ok if outcome == "ok" else metrics.requests.labels(name, outcome)).inc()
        series.latency.observe(elapsed / 1e9)
        if outcome != "cancelled":
            v.tally.answered(outcome == "ok", elapsed)


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
