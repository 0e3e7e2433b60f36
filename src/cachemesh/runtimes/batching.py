"""Opportunistic batching: requests that are already waiting, predicted in one call.

When several requests for the same model reach a worker together (they were
in one read from its socket), and the runtime is ``batchable``, the worker
stacks them along the first dimension, calls ``predict`` once, and splits the
outputs by rows. Nothing waits for a batch to fill: a request alone is
predicted alone, so latency never grows to wait for company. (Triton's dynamic
batcher and MLServer's adaptive batching hold requests for a while to batch
more; this one batches only what the queue already holds.)

Per-call overhead dominates small tabular models (sklearn validates its input,
looks up tags and feature names on every call: about 150 us for the digits
SVM), so N requests in one call cost little more than one.

Requests merge only when they are alike: the same input names, datatypes and
trailing shapes (at least 2-D, rows first), the same requested outputs and the
same parameters. If the merged call raises, or an output does not have one row
per input row, the worker runs the requests one by one, so each gets its own
answer or error.
"""

from __future__ import annotations

import numpy as np

from .types import InferenceRequest, InferenceResponse, Tensor

MAX_REQUESTS = 64


def _signature(r: InferenceRequest) -> tuple | None:
    rows = None
    sig = []
    for t in r.inputs:
        if t.data.ndim < 2 or t.parameters:
            return None
        if rows is None:
            rows = t.data.shape[0]
        elif t.data.shape[0] != rows:
            return None
        sig.append((t.name, t.datatype, t.data.shape[1:]))
    outs = tuple((o.name, tuple(sorted(o.parameters.items()))) for o in r.outputs)
    try:
        params = tuple(sorted(r.parameters.items()))
        hash(params)
    except TypeError:
        return None
    return (tuple(sig), outs, params)


def merge(requests: list[InferenceRequest]) -> tuple[InferenceRequest, list[int]] | None:
    """One request holding the rows of all, and each one's row count; None if unlike."""
    if len(requests) < 2:
        return None
    first = _signature(requests[0])
    if first is None or any(_signature(r) != first for r in requests[1:]):
        return None
    sizes = [r.inputs[0].data.shape[0] for r in requests] if requests[0].inputs else []
    if not sizes:
        return None
    inputs = []
    for i, t in enumerate(requests[0].inputs):
        data = np.concatenate([r.inputs[i].data for r in requests])
        inputs.append(Tensor(t.name, t.datatype, tuple(data.shape), data))
    head = requests[0]
    return InferenceRequest(inputs, head.outputs, head.parameters), sizes


def split(response: InferenceResponse, sizes: list[int]) -> list[InferenceResponse] | None:
    """Cut a merged response back into one per request; None if the rows do not line up."""
    total = sum(sizes)
    if any(t.data.ndim < 1 or t.data.shape[0] != total for t in response.outputs):
        return None
    bounds = np.cumsum([0, *sizes])
    out = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        tensors = []
        for t in response.outputs:
            part = t.data[start:end]
            tensors.append(Tensor(t.name, t.datatype, tuple(part.shape), part, dict(t.parameters)))
        out.append(InferenceResponse(tensors, dict(response.parameters)))
    return out
