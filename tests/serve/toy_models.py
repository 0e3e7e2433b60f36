"""Tiny custom runtimes for the server tests.

Each test model directory gets a copy of this file as ``toy.py`` and names a
class here as ``class=toy:Echo``, exactly as a user ships a custom runtime.
Behaviour is driven by the model's parameters; ``log`` names a directory where
loads and predictions are recorded (one file each), so a test can count them
across processes.
"""

from __future__ import annotations

import ctypes
import os
import time
import uuid
from pathlib import Path

import numpy as np

from cachemesh.errors import InferenceInputError
from cachemesh.runtimes import InferenceResponse, Runtime, Tensor


def _record(params: dict, what: str) -> None:
    log = params.get("log")
    if log:
        Path(log).mkdir(parents=True, exist_ok=True)
        (Path(log) / f"{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}").touch()


def _crash(how: str) -> None:
    if how == "exit":
        os._exit(3)
    if how == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if how == "kill":
        os.kill(os.getpid(), 9)  # what the kernel's OOM killer sends
    if how == "raise":
        raise RuntimeError("the model refused to load")
    if how == "oom":
        np.ones(8 * 1024**3, dtype=np.uint8)  # 8 GiB under RLIMIT_AS: MemoryError


_LEAKED: list = []  # what models with ``leak_on_unload`` never gave back


class Echo(Runtime):
    """Returns every input as an output of the same name, datatype and shape."""

    def load(self) -> None:
        _record(self.settings.parameters, "load")
        delay = float(self.settings.parameters.get("load_delay", 0))
        if delay:
            time.sleep(delay)
        how = self.settings.parameters.get("crash_on_load")
        if how:
            _crash(how)
        mb = int(self.settings.parameters.get("ballast_mb", 0))
        self.ballast = np.ones(mb * 1024 * 1024, dtype=np.uint8) if mb else None

    def unload(self) -> None:
        if self.settings.parameters.get("leak_on_unload"):
            _LEAKED.append(self.ballast)  # a runtime that keeps a reference
        self.ballast = None

    def predict(self, request):
        params = self.settings.parameters
        _record(params, "predict")
        delay = float(params.get("delay", 0))
        if delay:
            time.sleep(delay)
        how = params.get("crash_on_predict")
        if how:
            _crash(how)
        if request.parameters.get("fail") == "input":
            raise InferenceInputError("the toy rejects this request")
        if request.parameters.get("fail") == "model":
            raise ZeroDivisionError("the toy divided by zero")
        outputs = [Tensor(t.name, t.datatype, t.shape, t.data) for t in request.inputs]
        return InferenceResponse(outputs=outputs, parameters={"echoed": len(outputs)})

    def metadata(self):
        return {"platform": "toy", "inputs": [{"name": "any", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "any", "datatype": "FP32", "shape": [-1]}]}


class Chatty(Runtime):
    """Implements the optional generate and stream hooks."""

    def generate(self, payload):
        return {"text": payload["prompt"].upper()}

    def stream(self, payload):
        for word in payload["prompt"].split():
            yield {"token": word}


class Weights(Runtime):
    """Loads ``model.safetensors`` with cachemesh's loader; answers the sum of its tensors."""

    def load(self) -> None:
        from cachemesh.load import load_state_dict

        self.state = load_state_dict(Path(self.settings.path) / "model.safetensors")

    def predict(self, request):
        total = float(sum(float(t.double().sum()) for t in self.state.values()))
        return InferenceResponse(outputs=[Tensor("sum", "FP64", (1,), np.array([total]))])
