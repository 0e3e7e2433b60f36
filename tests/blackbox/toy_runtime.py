"""A custom runtime for the black-box tests, shipped in each toy model's folder as ``toy.py``.

It is what a user writes (``runtime=custom,class=toy:Toy``): a subclass of the
public ``cachemesh.runtimes.Runtime``. What it does is chosen by the model's
parameters (at load) and by each request's parameters or prompt (per call), so
that one class can make the server send every kind of message to its worker and
get every kind of answer back: a result, an input error, a model error, a stream,
a crash. Side effects the tests look for (a stream closed early) are written as
files under the ``marks`` parameter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cachemesh.errors import InferenceInputError
from cachemesh.runtimes import InferenceResponse, Runtime, Tensor


def _mark(params: dict, what: str) -> None:
    folder = params.get("marks")
    if folder:
        Path(str(folder)).mkdir(parents=True, exist_ok=True)
        (Path(str(folder)) / f"{what}-{os.getpid()}-{time.monotonic_ns()}").touch()


class Toy(Runtime):
    """Echoes V2 inputs; generates text by reversing the prompt's words."""

    def load(self) -> None:
        params = self.settings.parameters
        time.sleep(float(params.get("load_delay", 0)))
        how = str(params.get("load_fail", ""))
        if how == "raise":
            raise RuntimeError("the toy refuses to load")
        if how == "exit":
            os._exit(3)
        under = str(params.get("load_fail_under", ""))
        if under and any(os.environ.get("CACHEMESH_HOME", "").startswith(d)
                         for d in under.split(",")):
            raise RuntimeError("the toy refuses to load on this node")  # one node's fault
        self.predictions = 0
        _mark(params, "load")

    def unload(self) -> None:
        _mark(self.settings.parameters, "unload")

    def memory_bytes(self) -> int | None:
        # A size the runtime reports is the size the server accounts (and shows).
        return int(self.settings.parameters.get("size", 65536))

    def metadata(self) -> dict:
        return {"platform": "blackbox-toy",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}

    def stats(self) -> dict[str, float]:
        return {"predictions": float(self.predictions)}

    def predict(self, request):
        self.predictions += 1
        params = request.parameters
        time.sleep(float(params.get("delay", 0)))
        fail = params.get("fail")
        if fail == "input":
            raise InferenceInputError("the toy takes no request with fail=input")
        if fail == "model":
            raise ZeroDivisionError("the toy divided by zero")
        if fail == "crash":
            os._exit(7)
        repeat = int(params.get("repeat", 1))  # a reply larger than its request
        outputs = []
        for t in request.inputs:
            data = np.concatenate([t.data] * repeat) if repeat > 1 else t.data
            outputs.append(Tensor(t.name, t.datatype, data.shape, data))
        return InferenceResponse(outputs=outputs, parameters={"pid": os.getpid()})

    # -- the optional hooks, as the OpenAI adapter calls them -----------------------

    def _words(self, payload: dict) -> list[str]:
        if payload["kind"] == "chat":
            text = " ".join(m["content"] for m in payload["messages"])
        else:
            text = payload["prompt"]
        if text.startswith("refuse"):
            raise InferenceInputError("the toy refuses prompts that start with 'refuse'")
        if text.startswith("explode"):
            raise RuntimeError("the toy exploded")
        if text.startswith("die"):
            os._exit(9)
        return text.split()

    def generate(self, payload: dict) -> dict:
        if payload["kind"] == "embedding":
            vectors = [[float(len(t)), float(len(t.split()))] for t in payload["input"]]
            return {"embeddings": vectors, "prompt_tokens": sum(len(t.split())
                                                                for t in payload["input"])}
        words = self._words(payload)
        return {"text": " ".join(reversed(words)), "finish_reason": "stop",
                "prompt_tokens": len(words), "completion_tokens": len(words)}

    def stream(self, payload: dict):
        words = self._words(payload)
        slow = bool(words) and words[0] == "slow"
        try:
            for i, word in enumerate(reversed(words)):
                if i and words[0] == "break":
                    raise RuntimeError("the toy broke mid-stream")
                yield {"text": word + " "}
                if slow:
                    time.sleep(0.05)
        except GeneratorExit:
            _mark(self.settings.parameters, "cancelled")
            raise
        yield {"text": "", "finish_reason": "stop", "prompt_tokens": len(words),
               "completion_tokens": len(words)}

