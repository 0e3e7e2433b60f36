"""Runtimes for the security tests, shipped into model folders as ``toy.py``.

``Echo`` answers every input back and has no hidden switches (so no fuzzed
parameter can make it fail on purpose); ``Faulty`` raises inside predict on any
request, valid or not: a fault of the model, which must reach the client as a 5xx.
"""

from __future__ import annotations

from cachemesh.runtimes import InferenceResponse, Runtime, Tensor


class Echo(Runtime):
    def load(self) -> None:
        pass

    def predict(self, request):
        outputs = [Tensor(t.name, t.datatype, t.shape, t.data) for t in request.inputs]
        return InferenceResponse(outputs=outputs)


class Faulty(Runtime):
    def load(self) -> None:
        pass

    def predict(self, request):
        raise RuntimeError("the faulty toy failed on a valid request")
