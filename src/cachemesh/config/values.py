"""Parsers of the values the settings read: sizes, ports, numbers, booleans, paths."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidInputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse ``"20GiB"``, ``"1.5G"``, ``"512Mi"`` or a number of bytes into bytes."""
    if isinstance(text, bool):
        raise InvalidInputError(f"not a size: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise InvalidInputError(f"a size cannot be negative: {text!r}")
        return int(text)
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InvalidInputError(
            f"not a size: {text!r} (examples: 512MiB, 20GiB, 1.5G, 1000000)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int | float) -> str:
    """Bytes as a short human string with binary units: ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port, 0 included (for the ports that 0 turns off)."""
    return _int(environ, name, default, minimum=0, maximum=65535)


def _int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 1,
         maximum: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise InvalidInputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum}, got {value}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInputError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise InvalidInputError(f"{name} cannot be negative, got {value}")
    return value


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"{name} must be true or false, got {raw!r}")


def _positive(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _float(environ, name, default)
    if not value > 0:
        raise InvalidInputError(f"{name} must be positive, got {value}")
    return value


def _size(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    return parse_size(raw) if raw else None


def _secret(environ: Mapping[str, str], name: str) -> str | None:
    # Surrounding whitespace is a pasting accident (a trailing newline from a file).
    raw = (environ.get(name) or "").strip()
    return raw or None


def _path(environ: Mapping[str, str], name: str) -> Path | None:
    raw = (environ.get(name) or "").strip()
    return Path(raw).expanduser() if raw else None


def default_home(environ: Mapping[str, str]) -> Path:
    # CACHEMESH_HOME wins; else XDG_CACHE_HOME/cachemesh; else ~/.cache/cachemesh.
    if environ.get("CACHEMESH_HOME"):
        return Path(environ["CACHEMESH_HOME"]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cachemesh"


def worker_threads(environ: Mapping[str, str] | None = None) -> int:
    """A worker's thread budget: OMP_NUM_THREADS, which the server sets in each worker's
    environment from ``ServeSettings.worker_threads`` (serve/workers/workers.py); read in the
    worker, where runtimes pass it to libraries with pools of their own (onnxruntime,
    CTranslate2) that do not all read it. 0 when unset or malformed: the library picks."""
    raw = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "0")
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0
