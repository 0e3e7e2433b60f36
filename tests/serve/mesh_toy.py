"""A toy custom runtime for the mesh tests: each version answers with its own tag.

Copied into a model directory as ``toy.py`` (``class=toy:Tagged``). Parameters:
``tag`` (what it answers), ``delay`` (seconds per prediction), ``load_delay``,
``fail_load`` (raise while loading), ``ballast_mb`` (memory it holds). Its
``generate`` and ``stream`` hooks answer the tag too (the routing of the hooks).
"""

from __future__ import annotations

import os
import time

import numpy as np

from cachemesh.runtimes import InferenceResponse, Runtime, Tensor


class Tagged(Runtime):
    def load(self) -> None:
        params = self.settings.parameters
        time.sleep(float(params.get("load_delay", 0)))
        if params.get("fail_load"):
            raise RuntimeError(f"version {params.get('tag')} refuses to load")
        mb = int(params.get("ballast_mb", 0))
        self.ballast = np.ones(mb * 1024 * 1024, dtype=np.uint8) if mb else None

    def predict(self, request):
        params = self.settings.parameters
        delay = float(params.get("delay", 0))
        if delay:
            time.sleep(delay)
        tag = params.get("tag", "")
        return InferenceResponse(
            outputs=[Tensor("tag", "BYTES", (1,), np.array([tag.encode()], dtype=object))],
            parameters={"tag": tag, "pid": os.getpid()})

    def generate(self, payload):
        return {"text": self.settings.parameters.get("tag", "")}

    def stream(self, payload):
        yield {"text": self.settings.parameters.get("tag", "")}
