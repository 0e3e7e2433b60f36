"""Token-by-token decoding for causal language models (torch).

:func:`sample_tokens` runs a model one step at a time with its KV cache and
yields each new token as soon as it is picked; the caller stops it by no longer
iterating (closing the generator), which is how a disconnected streaming client
stops generation within one token. ``textgen.py`` turns the tokens into text
deltas and cuts them at stop strings.

Rejected: ``model.generate`` with a ``TextIteratorStreamer``. It runs the loop
on a thread of its own, and stopping it needs a stopping criterion polled by
that thread; the loop here is forty lines, stops by being closed, and reports
each token as it is made (the runtime counts them).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


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


def cache_argument(model: Any) -> str:
    """The name under which the model's forward takes and returns its key/value cache:
    ``cache`` from transformers 5.2x on, ``past_key_values`` before (where the old name
    still works, it warns on every call: a FutureWarning in the server's console)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


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
    cache = cache_argument(model)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            with guard():
                out = model(input_ids=ids, use_cache=True, **{cache: past})
            past = out[cache] if cache in out else None
            token = pick_token(out.logits[0, -1], temperature, top_p, generator)
            del out
            yield token
            if token in eos_ids:
                return
            ids = torch.tensor([[token]], dtype=torch.long, device=device)


class Counter:
    """A thread-safe running count (tokens generated, streams cancelled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n
