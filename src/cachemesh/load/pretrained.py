"""``load_pretrained``: a transformers model from a local checkpoint, without random init.

How it builds the model:

1. Headers are read and validated, and the stream starts reading (``stream.py``),
   so the I/O overlaps with everything below.
2. The model is constructed with every *parameter* on the meta device (no
   memory, no random initialisation worth the name) while *buffers* stay real.
   Buffers are what a checkpoint usually lacks and a constructor computes: rotary
   ``inv_freq``, ``position_ids``, ``token_type_ids``. Building everything on
   meta, as ``torch.device("meta")`` would, leaves those to be recomputed by
   model-specific code; keeping them real lets the model's own constructor
   compute them, for any architecture. (Accelerate's ``init_empty_weights(
   include_buffers=False)`` works the same way.)
3. Loaded tensors are assigned, not copied, into the model
   (``load_state_dict(assign=True)``), each cast to the dtype the model chose
   for it where both are floating types.
4. Weights the checkpoint leaves out because they are tied (``lm_head.weight``
   to the input embeddings) are tied with transformers' own ``tie_weights``.
5. Anything still on the meta device is a parameter the checkpoint does not
   have: that is an error, never a silently random weight.

Checkpoint keys match the model's ``state_dict`` keys, or match them once the
model's ``base_model_prefix`` is added or removed (a base-model checkpoint
loaded into a model with a head, and the reverse). Checkpoints that
transformers converts while loading (legacy names such as ``gamma``/``beta``,
per-expert MoE weights that transformers 5 fuses) and quantized checkpoints are
refused with :class:`LoadError`; ``from_pretrained`` handles those.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError
from .checkpoint import Checkpoint, read_checkpoint, resolve_source
from .format import DTYPES
from .iterate import iter_tensors
from .tensors import CASTABLE, resolve_dtype

logger = logging.getLogger(__name__)

# Buffers that transformers itself drops from old checkpoints: recomputed, not loaded.
_IGNORED_UNEXPECTED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")

_meta_state = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_original_register_parameter: Callable[..., None] | None = None


def _register_parameter_on_meta(
    module: torch.nn.Module, name: str, param: torch.nn.Parameter | None
) -> None:
    assert _original_register_parameter is not None
    if param is not None and getattr(_meta_state, "depth", 0) and not param.is_meta:
        param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        # transformers' init functions skip tensors so marked: running them on
        # meta tensors does nothing useful and cost 0.5 s for a 1B model.
        # Buffers stay unmarked, so code that recomputes them still runs.
        param._is_hf_initialized = True
    _original_register_parameter(module, name, param)


# torch.empty calls at least this large are made on the meta device while a model is
# built (see _EmptyOnMeta).
_META_EMPTY_BYTES = 1024 * 1024


class _EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """``torch.empty`` without a device gives a meta tensor, when it is large.

    That is how ``nn.Linear`` and ``nn.Embedding`` make their weights, which the
    patched ``register_parameter`` would move to meta anyway: made on the CPU, each
    was a real allocation and a free of up to hundreds of MB, and with the loader's
    threads faulting pages into its buffers meanwhile those mmap/munmap calls took
    1.4 s for a 1B model, against 0.1 s alone. Buffers are made with ``arange``,
    ``zeros`` or ``ones`` (transformers makes none with ``empty``) and stay real; one
    that were made with ``empty`` and not loaded would be caught by
    ``_check_materialized``, never left random. Torch function modes are per thread.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None and _large(args, kwargs):
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _large(args: Any, kwargs: dict[str, Any]) -> bool:
    size = kwargs.get("size", args[0] if len(args) == 1 else args)
    if isinstance(size, int):
        size = (size,)
    try:
        n = 1
        for dim in size:
            n *= int(dim)
    except (TypeError, ValueError):
        return False
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    return n * dtype.itemsize >= _META_EMPTY_BYTES


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this block, parameters registered *by this thread* land on the meta device.

    ``nn.Module.register_parameter`` is patched while any thread is inside such a
    block; other threads see the original behaviour.
    """
    global _patch_users, _original_register_parameter
    with _patch_lock:
        if _patch_users == 0:
            _original_register_parameter = torch.nn.Module.register_parameter
            torch.nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]
        _patch_users += 1
    _meta_state.depth = getattr(_meta_state, "depth", 0) + 1
    try:
        with _EmptyOnMeta():
            yield
    finally:
        _meta_state.depth -= 1
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0 and _original_register_parameter is not None:
                torch.nn.Module.register_parameter = _original_register_parameter  # type: ignore[method-assign]
                _original_register_parameter = None


def load_pretrained(
    path_or_source: str | os.PathLike[str],
    auto_class: type | str | None = None,
    *,
    device: torch.device | str | int = "cpu",
    dtype: torch.dtype | str = "auto",
    threads: int | None = None,
    trust_remote_code: bool = False,
    on_phase: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Build a transformers model from a checkpoint directory (or cache source).

    ``auto_class`` picks the class: an ``AutoModel*`` class, a model class, or
    either's name; by default the first of ``config.architectures``, else
    ``AutoModel``. ``dtype="auto"`` (the default, as in ``from_pretrained``)
    uses the config's dtype, else the checkpoint's. Other keyword arguments go
    to the model's construction (for example ``attn_implementation="eager"``).
    The model is returned in eval mode, on ``device``. ``on_phase`` is called with
    ``"reading"`` (the reads started), ``"built"`` (the model stands on the meta
    device) and ``"read"`` (the last tensor landed), for callers that time them.
    """
    mark = on_phase or (lambda phase: None)
    import transformers

    path = resolve_source(path_or_source)
    if not path.is_dir():
        raise LoadError(f"{path}: load_pretrained needs a model directory with config.json")
    checkpoint = read_checkpoint(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read the model config: {exc}") from exc
    if getattr(config, "quantization_config", None):
        raise LoadError(f"{path}: quantized checkpoints are not supported; use from_pretrained")
    model_dtype = _model_dtype(dtype, config, checkpoint)

    with iter_tensors(checkpoint, device=device, threads=threads) as stream:
        mark("reading")
        with parameters_on_meta():
            model = _build(transformers, auto_class, config, model_dtype, trust_remote_code, kwargs)
        mark("built")
        expected = model.state_dict(keep_vars=True)
        rename = key_mapper(
            [t.name for t in checkpoint.tensors()],
            expected,
            getattr(model, "base_model_prefix", ""),
        )
        loaded: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        for name, tensor in stream:
            key = rename(name)
            target = expected.get(key)
            if target is None:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                raise LoadError(
                    f"{path}: tensor {name!r} has shape {list(tensor.shape)} but the model's "
                    f"{key!r} has {list(target.shape)}"
                )
            if (
                tensor.dtype != target.dtype
                and tensor.dtype in CASTABLE
                and target.dtype in CASTABLE
            ):
                tensor = tensor.to(target.dtype)
            loaded[key] = tensor
        mark("read")

    model.load_state_dict(loaded, strict=False, assign=True)
    missing = set(expected) - set(loaded)
    del loaded, expected
    _tie_weights(model, missing)
    _check_materialized(model, path)
    # Parameters are on `device` already; this moves the buffers built on the CPU.
    model.to(torch.device(device))
    model.eval()
    _load_generation_config(model, path)
    _report_unexpected(model, path, unexpected)
    return model


def _model_dtype(dtype: torch.dtype | str, config: Any, checkpoint: Checkpoint) -> torch.dtype:
    if dtype != "auto":
        resolved = resolve_dtype(dtype)
        assert resolved is not None
        return resolved
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if configured is not None:
        resolved = resolve_dtype(configured)
        if resolved is not None:
            return resolved
    # As from_pretrained does: the first floating tensor's dtype.
    for info in checkpoint.tensors():
        torch_name = DTYPES[info.dtype].torch_name
        value = getattr(torch, torch_name, None) if torch_name else None
        if value in CASTABLE:
            return value
    return torch.get_default_dtype()


def _build(
    transformers: Any,
    auto_class: type | str | None,
    config: Any,
    dtype: torch.dtype,
    trust_remote_code: bool,
    kwargs: dict[str, Any],
) -> Any:
    if isinstance(auto_class, str):
        found = getattr(transformers, auto_class, None)
        if found is None:
            raise LoadError(f"transformers has no class {auto_class!r}")
        auto_class = found
    if auto_class is None:
        architectures = getattr(config, "architectures", None) or []
        auto_class = getattr(transformers, architectures[0], None) if architectures else None
        auto_class = auto_class or transformers.AutoModel
    major = int(transformers.__version__.split(".")[0])
    options = dict(kwargs)
    options["dtype" if major >= 5 else "torch_dtype"] = dtype
    if issubclass(auto_class, transformers.PreTrainedModel):
        return auto_class._from_config(config, **options)
    return auto_class.from_config(config, trust_remote_code=trust_remote_code, **options)


def key_mapper(
    names: Iterable[str], expected: Mapping[str, object], prefix: str
) -> Callable[[str], str]:
    """Map checkpoint names to model keys: as they are, or with ``prefix.`` added or removed.

    Picks whichever of the three matches the most names; in the add and remove
    modes a name changes only where the changed name is a model key (so a head's
    ``lm_head.weight`` keeps its name next to a prefixed body).
    """
    names = list(names)
    if not prefix:
        return lambda name: name
    dotted = prefix + "."
    as_is = sum(n in expected for n in names)
    added = sum(dotted + n in expected for n in names)
    removed = sum(n.startswith(dotted) and n[len(dotted) :] in expected for n in names)
    if as_is >= max(added, removed):
        return lambda name: name
    if added >= removed:
        return lambda name: dotted + name if dotted + name in expected else name
    return lambda name: (
        name[len(dotted) :] if name.startswith(dotted) and name[len(dotted) :] in expected else name
    )


def _tie_weights(model: Any, missing: set[str]) -> None:
    tie = getattr(model, "tie_weights", None)
    if tie is None:
        return
    try:
        # transformers 5: ties symmetrically, using what the checkpoint had.
        tie(missing_keys=missing)
    except TypeError:
        tie()


def _check_materialized(model: torch.nn.Module, path: Path) -> None:
    left = [name for name, p in model.named_parameters() if p.is_meta]
    left += [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise LoadError(
            f"{path}: the checkpoint has no weights for {shown}; it is not a checkpoint "
            "of this model class, or transformers converts its keys while loading"
        )


def _load_generation_config(model: Any, path: Path) -> None:
    if not (path / "generation_config.json").is_file():
        return
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        return
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        logger.warning("%s: generation_config.json ignored: %s", path, exc)


def _report_unexpected(model: Any, path: Path, unexpected: list[str]) -> None:
    patterns = [
        re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    ]
    left = [
        n
        for n in unexpected
        if not _IGNORED_UNEXPECTED.search(n) and not any(p.search(n) for p in patterns)
    ]
    if left:
        logger.warning(
            "%s: %d checkpoint tensors are not used by %s: %s",
            path,
            len(left),
            type(model).__name__,
            ", ".join(left[:8]),
        )
