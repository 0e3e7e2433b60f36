"""Token-by-token decoding for causal language models, and its text deltas.

:func:`sample_tokens` runs a model one step at a time with its KV cache and
yields each new token as soon as it is picked; the caller stops it by no longer
iterating (closing the generator), which is how a disconnected streaming client
stops generation within one token. :class:`TextDeltas` turns those tokens into
text deltas: it waits while the text ends in an incomplete UTF-8 sequence,
holds back a tail that could be the start of a stop string, and cuts the text
at the first stop string.

Rejected: ``model.generate`` with a ``TextIteratorStreamer``. It runs the loop
on a thread of its own, and stopping it needs a stopping criterion polled by
that thread; the loop here is forty lines, stops by being closed, and reports
each token as it is made (the runtime counts them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


def pick_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> int:
    """Greedy when ``temperature`` is 0, else nucleus sampling from ``logits`` (1-D)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(model: Any, prompt_ids: Sequence[int], *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0,
                  eos_ids: frozenset[int] = frozenset(), seed: int | None = None,
                  step: Callable[[], AbstractContextManager[Any]] | None = None,
                  ) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens continuing ``prompt_ids``; an end-of-sequence
    token is yielded, then the generator ends.

    ``step`` wraps each forward pass (a shared base model's lock, with the right
    adapter switched on: see ``adapters.py``).
    """
    device = next(model.parameters()).device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    past = None
    guard = step or nullcontext
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            with guard():
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = pick_token(out.logits[0, -1], temperature, top_p, generator)
            del out
            yield token
            if token in eos_ids:
                return
            ids = torch.tensor([[token]], dtype=torch.long, device=device)


class TextDeltas:
    """The text of generated tokens, handed out in pieces that never need taking back."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False  # a stop string was found: generation should end

    def push(self, token: int) -> str:
        """Add one token; the text that can be sent now (may be "")."""
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT):
            return ""  # the middle of a multi-byte character: wait for the rest
        self._text = text
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self._text = text[:cut]
            return self._take(cut)
        return self._take(len(text) - self._held_back(text))

    def finish(self) -> str:
        """What is left once generation ended: the held-back tail and any incomplete
        character at the end (as the decoder shows it), unless a stop string came."""
        if self.stopped:
            return ""
        text = self._decode(self._ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        self._text = text
        return self._take(len(text))

    @property
    def text(self) -> str:
        return self._text

    def _take(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece = self._text[self._sent:upto]
        self._sent = upto
        return piece

    def _find_stop(self, text: str) -> int | None:
        # Only text not yet sent can hold a new stop string (plus its overlap with what was).
        found = None
        for s in self._stop:
            i = text.find(s, max(0, self._sent - len(s) + 1))
            if i != -1 and (found is None or i < found):
                found = i
        return found

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text) - self._sent), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


class Counter:
    """A thread-safe running count (tokens generated, streams cancelled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n
