"""cachemesh: take models out of container images and make them start fast.

This module is the public Python API and nothing else. Heavy parts (torch, the
server) are imported on first use, so ``import cachemesh`` stays cheap.
"""

import typing as _typing

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "pull",
    "load_state_dict",
    "iter_tensors",
    "load_pretrained",
    "Settings",
    "CachemeshError",
]

from .config import Settings
from .errors import CachemeshError

# name -> module that defines it; imported lazily by __getattr__.
_LAZY: dict[str, str] = {
    "pull": "cachemesh.caches",
    "load_state_dict": "cachemesh.load",
    "iter_tensors": "cachemesh.load",
    "load_pretrained": "cachemesh.load",
}


def __getattr__(name: str) -> _typing.Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cachemesh' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if _typing.TYPE_CHECKING:  # pragma: no cover
    from .caches import pull as pull
    from .load import iter_tensors as iter_tensors
    from .load import load_pretrained as load_pretrained
    from .load import load_state_dict as load_state_dict
