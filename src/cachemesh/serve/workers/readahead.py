"""Reading a model's files ahead of its load, while something else runs (a worker's
framework imports): into the page cache, or a safetensors checkpoint into the
loader's own buffers (``load/prefetch.py``), which its load adopts."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".joblib", ".pkl")


def weight_files(paths: Any) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        root = Path(path)
        found = [root] if root.is_file() else (sorted(root.rglob("*")) if root.is_dir() else [])
        files += [f for f in found if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    return files


def package_files(packages: Any) -> list[Path]:
    """The shared libraries and modules of installed packages (not imported here)."""
    import importlib.util

    files: list[Path] = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder, _, names in os.walk(root):
                files += [Path(folder, n) for n in names
                          if n.endswith((".so", ".pyc")) or ".so." in n]
    return files


def read_weights_ahead(paths: Any) -> None:
    """Start reading the models in ``paths`` for their loads: a safetensors
    checkpoint into the loader's own buffers (``load/prefetch.py``: its load
    adopts them), other weight files into the page cache."""
    from ...load import prefetch

    rest = []
    for path in paths:
        try:
            started = prefetch.start(path)
        except Exception:  # noqa: BLE001 - best effort; the load reads what is missing
            started = None
        if started is None:
            rest.append(path)
    read_ahead(weight_files(rest))


def read_ahead(files: list[Path] | Callable[[], list[Path]]) -> None:
    """Ask the kernel to read ``files`` (or what the callable returns, called on
    the thread) into the page cache, on a daemon thread (``posix_fadvise(WILLNEED)``
    submits the reads and may block while it does). Best effort: a file that
    cannot be opened is skipped."""
    if not files or not hasattr(os, "posix_fadvise"):
        return

    def run() -> None:
        for f in files() if callable(files) else files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    threading.Thread(target=run, name="cachemesh-readahead", daemon=True).start()
