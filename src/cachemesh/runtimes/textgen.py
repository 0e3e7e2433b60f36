"""Pieces every text-generating runtime needs, whatever its engine.

- :func:`parse_generate_request` checks a :class:`~.generation.GenerateRequest`
  payload and fills in the defaults (the same ones as OpenAI's: 16 tokens,
  temperature 1, top_p 1), so a runtime never guesses at a malformed payload;
- :class:`IncrementalDecoder` turns token ids, one at a time, into text deltas
  whose concatenation is the text of the whole sequence;
- :class:`StopStrings` cuts the text at the first stop string, holding back
  whatever might still become one, so a streamed client never sees a stop
  string's first half.

Why a window and not ``decode(all ids)`` every step: that costs O(n) per
token, O(n^2) per answer. The window (as TGI and vLLM do it) decodes a few ids
before the unread ones together with them and emits the difference, which
keeps the spaces that SentencePiece tokenizers drop at a sequence's start, and
waits while the text ends in U+FFFD: a character split across byte tokens is
emitted when its last byte arrives, never as replacement characters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InferenceInputError

KINDS = ("completion", "chat", "embedding")
DEFAULT_MAX_TOKENS = 16
REPLACEMENT = "\ufffd"


@dataclass
class TextRequest:
    """A checked GenerateRequest, defaults filled in."""

    kind: str
    prompt: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(payload: dict[str, Any], key: str, default: float, low: float, high: float,
            *, low_open: bool = False) -> float:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InferenceInputError(f"{key} must be a number, got {value!r}")
    value = float(value)
    if not (low < value if low_open else low <= value) or value > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InferenceInputError(f"{key} must be in {bound}, got {value}")
    return value


def parse_generate_request(payload: Any) -> TextRequest:
    """Check a generate/stream payload; raise InferenceInputError on anything wrong."""
    if not isinstance(payload, dict):
        raise InferenceInputError(f"a generate request is a JSON object, got {type(payload).__name__}")
    kind = payload.get("kind")
    if kind not in KINDS:
        raise InferenceInputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    req = TextRequest(kind=kind)
    if kind == "completion":
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            raise InferenceInputError(f"a completion needs prompt (a string), got {prompt!r}")
        req.prompt = prompt
    elif kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InferenceInputError("a chat request needs messages (a non-empty list)")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise InferenceInputError(
                    f"messages[{i}] must be an object with string role and content, got {m!r}"
                )
        req.messages = [dict(m) for m in messages]
    else:
        inputs = payload.get("input")
        if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
            raise InferenceInputError("an embedding request needs input (a list of strings)")
        req.inputs = list(inputs)
    max_tokens = payload.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InferenceInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        req.max_tokens = max_tokens
    req.temperature = _number(payload, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(payload, "top_p", 1.0, 0.0, 1.0, low_open=True)
    stop = payload.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InferenceInputError(f"stop must be a list of non-empty strings, got {stop!r}")
        req.stop = list(stop)
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InferenceInputError(f"seed must be an integer, got {seed!r}")
    req.seed = seed
    return req


class IncrementalDecoder:
    """Token ids in, text deltas out (see the module docstring).

    ``decode`` turns a list of ids into text (special tokens skipped); ``context``
    is the prompt, whose last few ids give the first generated token the same
    leading space it has in the whole sequence.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = (),
                 window: int = 5) -> None:
        self._decode = decode
        self._ids = list(context[-window:]) if window else []
        self._prefix = 0  # where the decoded window starts
        self._read = len(self._ids)  # ids before this one have been emitted

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if not final and (len(text) <= len(before) or text.endswith(REPLACEMENT)):
            return ""
        if not text.startswith(before):
            # A tokenizer whose decoding of the window changed its start (rare; some
            # cleanup rules): emit what follows the common prefix.
            common = 0
            for a, b in zip(before, text, strict=False):
                if a != b:
                    break
                common += 1
            delta = text[common:]
        else:
            delta = text[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        return delta


class StopStrings:
    """Cuts streamed text at the first stop string; the stop string is not returned."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held back) that is certainly not a stop."""
        if self.stopped:
            return ""
        pending = self._held + text
        if not self._stops:
            self._held = ""
            return pending
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            first = min(hits)
            # A stop that starts before ``first`` and may still complete with more text
            # wins if it does (the earliest start, as on the whole text): wait for it.
            longest = max(len(s) for s in self._stops)
            for q in range(max(0, len(pending) - longest + 1), first):
                if any(len(s) > len(pending) - q and s.startswith(pending[q:])
                       for s in self._stops):
                    self._held = pending[q:]
                    return pending[:q]
            self.stopped = True
            self._held = ""
            return pending[:first]
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:k]):
                    hold = k
                    break
        self._held = pending[len(pending) - hold:] if hold else ""
        return pending[:len(pending) - hold]

    def flush(self) -> str:
        """At the end of generation, what was held back is plain text."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        hits = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        if hits:  # a stop was complete while a longer one that started earlier was pending
            self.stopped = True
            return held[:min(hits)]
        return held
