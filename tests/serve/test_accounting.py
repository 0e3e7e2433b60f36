"""Counted (serve/core/accounting.py): each way a request can end, under its outcome label,
in the latency histogram and in its version's tally (Triton's statistics)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

from cachemesh.errors import (
    InvalidInputError,
    ModelFailedError,
    ModelNotFoundError,
    RequestTimeoutError,
    UnavailableError,
)
from cachemesh.serve.core.accounting import Counted
from cachemesh.serve.core.metrics import Metrics
from cachemesh.serve.core.state import Tally

ENDINGS = [
    (None, "ok"),
    (InvalidInputError("bad input"), "client_error"),
    (ModelNotFoundError("m"), "client_error"),
    (RequestTimeoutError("too slow"), "timeout"),  # before its base class, UnavailableError
    (UnavailableError("busy"), "unavailable"),
    (ModelFailedError("broken"), "failed"),
    (asyncio.CancelledError(), "cancelled"),
    (GeneratorExit(), "cancelled"),
    (RuntimeError("a bug"), "error"),
]


def test_every_ending_is_counted_under_its_outcome():
    metrics = Metrics()
    dep = SimpleNamespace(name="m", series=None)
    version = SimpleNamespace(tally=Tally())
    for error, _ in ENDINGS:
        with contextlib.suppress(BaseException):
            with Counted(metrics, "m", dep, version) as series:  # type: ignore[arg-type]
                assert series.inflight._value.get() == 1
                if error is not None:
                    raise error
    want: dict[str, int] = {}
    for _, label in ENDINGS:
        want[label] = want.get(label, 0) + 1
    for label, n in want.items():
        assert metrics.requests.labels("m", label)._value.get() == n, label
    assert metrics.inflight.labels("m")._value.get() == 0
    assert metrics.latency.labels("m")._sum.get() > 0
    tally = version.tally
    # A cancelled request (the client went away) is neither a success nor a failure.
    assert (tally.success, tally.fail) == (1, len(ENDINGS) - 1 - want["cancelled"])
    assert tally.success_ns > 0 and tally.last_ms > 0
