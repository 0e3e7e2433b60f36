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


class Parrot(Runtime):
    """A generative toy that follows runtimes/generation.py: it repeats the prompt's
    words (at most 8), so the OpenAI endpoints are fuzzed down to a runtime's answer."""

    def load(self) -> None:
        pass

    def _words(self, payload):
        from cachemesh.errors import InferenceInputError

        if payload.get("kind") == "chat":
            words = " ".join(m["content"] for m in payload["messages"]).split()
        elif payload.get("kind") == "completion":
            words = payload["prompt"].split()
        else:
            raise InferenceInputError(f"kind {payload.get('kind')!r} does not generate")
        return (words or ["..."])[:min(8, payload.get("max_tokens", 16))]

    def generate(self, payload):
        if payload.get("kind") == "embedding":
            return {"embeddings": [[float(len(t)), 1.0, 0.0, 0.5] for t in payload["input"]],
                    "prompt_tokens": len(payload["input"])}
        words = self._words(payload)
        return {"text": " ".join(words), "finish_reason": "length", "prompt_tokens": 1,
                "completion_tokens": len(words)}

    def stream(self, payload):
        words = self._words(payload)
        yield {"text": ""}
        for w in words:
            yield {"text": w + " "}
        yield {"text": "", "finish_reason": "length", "prompt_tokens": 1,
               "completion_tokens": len(words)}
