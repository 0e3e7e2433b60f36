"""PEFT adapters (LoRA and kin) over base models shared inside one worker process.

An adapter model is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``; its base comes from another cache. Every adapter
over the same base (same files, same dtype) in a worker shares one copy of the
base: the first adapter loads it (through ``cachemesh.load_pretrained``) and
wraps it in a ``PeftModel``; the next ones only add their adapter weights
(read by ``cachemesh.load_state_dict``) under a name of their own. The last
adapter to unload frees the base.

A ``PeftModel`` has one active adapter at a time, so the forward passes over a
shared base take its lock and switch the adapter they need on first
(:meth:`SharedBase.step`); requests for different adapters interleave token by
token. (PEFT's per-call ``adapter_names`` installs hooks on the shared modules,
which two threads would race on.)

The server pulls the base into a cache of its own in the adapter model's bucket,
with that bucket's protection, and hands the worker its view as a local path
(``ModelService._pull_base``); a deploy checks ``base=`` as it checks a model's
source (``ModelService._check_sources``). Outside the server (a plain
``load_pretrained``) a ``base`` with a scheme is pulled here, in the default bucket.
Adapters over one base share it only inside a worker: on two workers, each loads
the base once.

Memory: the worker measures a load as its RSS growth, so the first adapter's
size includes the base and the next ones' do not; the base stays while any
adapter over it is loaded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, LoadError

ADAPTER_CONFIG = "adapter_config.json"

_lock = threading.Lock()
_bases: dict[tuple[str, str], SharedBase] = {}
# How many times this process built a base model for adapters (tests assert on it).
base_loads = 0


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def base_source(path: Path, parameters: dict[str, Any]) -> str:
    """Where the adapter's base comes from: the ``base`` parameter (any source
    ``cachemesh pull`` takes, or a path), else the adapter config's
    ``base_model_name_or_path`` when it is a local directory, else that name on the Hub."""
    named = parameters.get("base")
    if named:
        return str(named)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path / ADAPTER_CONFIG}: not valid JSON: {exc}") from exc
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base or not isinstance(base, str):
        raise InvalidInputError(
            f"{path / ADAPTER_CONFIG} names no base model; give one with base=SOURCE")
    if Path(base).is_dir():
        return base
    return f"hf://{base}"


@dataclass(eq=False)
class SharedBase:
    """One base model wrapped in a PeftModel, and the adapters loaded over it."""

    key: tuple[str, str]
    path: Path
    model: Any  # a peft.PeftModel once the first adapter is in
    adapters: set[str] = field(default_factory=set)
    active: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self, adapter: str) -> Callable[[], Any]:
        """A context manager factory for one forward pass with ``adapter`` on."""

        @contextmanager
        def guard() -> Iterator[None]:
            with self.lock:
                if self.active != adapter:
                    self.model.set_adapter(adapter)
                    self.active = adapter
                yield

        return guard


def attach(adapter_path: Path, adapter_name: str, base: str, *,
           load_base: Callable[[str], tuple[Path, Any]], dtype: str) -> SharedBase:
    """Load the adapter in ``adapter_path`` over ``base`` (shared if already loaded here).

    ``load_base(source)`` returns (the base's local path, the model) and is
    called only when no adapter over that base is loaded in this process.
    """
    global base_loads
    import peft
    from peft.utils import set_peft_model_state_dict

    from ..load import load_state_dict
    from ..load.checkpoint import resolve_source

    try:
        config = peft.PeftConfig.from_pretrained(str(adapter_path))
    except (OSError, ValueError, TypeError) as exc:
        raise LoadError(f"{adapter_path}: not a PEFT adapter: {exc}") from exc
    config.inference_mode = True
    base_path = resolve_source(base)
    key = (str(base_path.resolve()), dtype)
    with _lock:
        shared = _bases.get(key)
        if shared is None:
            path, model = load_base(str(base_path))
            peft_model = peft.PeftModel(model, config, adapter_name=adapter_name)
            shared = SharedBase(key, path, peft_model)
            _bases[key] = shared
            base_loads += 1
        else:
            with shared.lock:
                shared.model.add_adapter(adapter_name, config)
        try:
            weights = load_state_dict(adapter_path)
            with shared.lock:
                result = set_peft_model_state_dict(shared.model, weights,
                                                   adapter_name=adapter_name)
                unexpected = list(getattr(result, "unexpected_keys", []) or [])
                if unexpected:
                    raise LoadError(
                        f"{adapter_path}: adapter weights that fit no layer of the base:"
                        f" {', '.join(unexpected[:5])}")
                shared.model.eval()
        except BaseException:
            _drop(shared, adapter_name)
            raise
        shared.adapters.add(adapter_name)
        return shared


def detach(shared: SharedBase, adapter_name: str) -> None:
    with _lock:
        _drop(shared, adapter_name)


def _drop(shared: SharedBase, adapter_name: str) -> None:
    shared.adapters.discard(adapter_name)
    if not shared.adapters:
        _bases.pop(shared.key, None)  # the last one out frees the base
        shared.model = None
        return
    with shared.lock:
        if adapter_name in getattr(shared.model, "peft_config", {}):
            if shared.active == adapter_name or shared.active is None:
                shared.model.set_adapter(next(iter(shared.adapters)))
                shared.active = next(iter(shared.adapters))
            shared.model.delete_adapter(adapter_name)
