"""The contract between generative runtimes and the OpenAI adapter.

A runtime that generates text (``transformers``, ``ctranslate2``) implements the
optional ``generate`` and ``stream`` hooks of :class:`~.base.Runtime` with the
payloads below; ``serve/adapters/openai.py`` turns OpenAI requests into them and their
answers back into OpenAI responses. Payloads are plain dicts so that they cross
the worker's socket (``serve/workers/ipc.py``) as they are.

One request, :class:`GenerateRequest`::

    {"kind": "completion", "prompt": "Once upon", "max_tokens": 16,
     "temperature": 0.0, "top_p": 1.0, "stop": ["\\n"], "seed": 7}
    {"kind": "chat", "messages": [{"role": "user", "content": "hi"}], ...}
    {"kind": "embedding", "input": ["first text", "second text"]}

``generate`` answers a :class:`GenerateResult` (an :class:`EmbeddingResult` for
``"embedding"``). ``stream`` yields :class:`StreamChunk` items: text deltas as
they are decoded, then one last chunk that carries ``finish_reason`` and the
token counts. When the consumer stops iterating (the HTTP client went away) the
runtime's generator is closed and generation stops.

Errors: what the request got wrong (a chat request for a model without a chat
template, a prompt longer than the model's context, an unknown ``kind``) raises
:class:`~cachemesh.errors.InferenceInputError`, which the client sees as a 4xx.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

Kind = Literal["completion", "chat", "embedding"]
FinishReason = Literal["stop", "length"]


class Message(TypedDict):
    role: str
    content: str


class GenerateRequest(TypedDict):
    kind: Kind
    prompt: NotRequired[str]  # completion
    messages: NotRequired[list[Message]]  # chat
    input: NotRequired[list[str]]  # embedding
    max_tokens: NotRequired[int]  # default 16, as OpenAI's completions
    temperature: NotRequired[float]  # 0: greedy
    top_p: NotRequired[float]
    stop: NotRequired[list[str]]  # stop strings; not part of the returned text
    seed: NotRequired[int | None]


class GenerateResult(TypedDict):
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class EmbeddingResult(TypedDict):
    embeddings: list[list[float]]
    prompt_tokens: int


class StreamChunk(TypedDict):
    text: str  # the newly decoded text; "" in the last chunk
    finish_reason: NotRequired[FinishReason]  # only in the last chunk
    prompt_tokens: NotRequired[int]  # only in the last chunk
    completion_tokens: NotRequired[int]  # only in the last chunk
