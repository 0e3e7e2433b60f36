"""Small helpers runtimes share: files in a model directory, and parameters.

Parameters arrive as strings from ``--model NAME=SRC,key=value`` and as JSON
values from ``--config`` and the control API; these parse both the same way
and name the parameter in the error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, ModelLoadError

# Written by ``cachemesh convert`` (convert/identity.py); read here without importing
# the converters: ``runtime`` says what loads the directory (engine, class, files).
CONVERT_MANIFEST = "cachemesh-convert.json"


def uri_file(path: Path, uri: str) -> Path:
    """The file a ``uri`` parameter names, which must lie inside the model directory."""
    candidate = (path / uri).resolve()
    if not candidate.is_relative_to(path.resolve()):
        raise InvalidInputError(f"model uri {uri!r} points outside the model directory {path}")
    if not candidate.is_file():
        raise ModelLoadError(f"model file {uri!r} not found in {path}")
    return candidate


def single_file(path: Path, suffixes: tuple[str, ...], kind: str,
                defaults: tuple[str, ...]) -> Path:
    """The only file of ``path`` with one of ``suffixes``; a clear error for none or several.

    ``kind`` names what is looked for ("model file"), ``defaults`` the names that
    would have been taken first (for the message)."""
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"no {kind} ({', '.join(defaults)}) in {path}")
    raise ModelLoadError(
        f"several {kind}s in {path} ({', '.join(p.name for p in found)}); set parameter uri"
    )


def read_json_object(file: Path) -> dict[str, Any] | None:
    """A JSON object from ``file``; None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def conversion_runtime(path: Path) -> dict[str, Any]:
    """The ``runtime`` section of a converted directory's manifest ({} if none)."""
    if not path.is_dir():
        return {}
    runtime = (read_json_object(path / CONVERT_MANIFEST) or {}).get("runtime")
    return runtime if isinstance(runtime, dict) else {}


def flag(value: Any) -> bool:
    """A boolean parameter: anything but 0, false, no, off (any case) or a JSON false."""
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)


def int_param(params: dict[str, Any], key: str, default: int | None,
              minimum: int = 0) -> int | None:
    """An integer parameter, at least ``minimum``; ``default`` when absent or empty."""
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"parameter {key} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise InvalidInputError(f"parameter {key} must be an integer, got {value!r}")
    if number < minimum:
        raise InvalidInputError(f"parameter {key} must be >= {minimum}, got {number}")
    return number
