"""The identity of a conversion, and the manifest that names it in the result.

A conversion is a pure function of its input bytes, the converter (and the
versions of the libraries that shape its output) and the options. Its
identity is the sha256 of the canonical JSON (sorted keys, no spaces) of::

    {"format": "cachemesh-convert/1",
     "target": "ct2",
     "converter": {"name": "ctranslate2", "revision": 1,
                   "versions": {"ctranslate2": "4.8.5", "transformers": "5.23.0"}},
     "options": {"quantization": "int8"},      # only the options that were set (tp, dtype)
     "inputs": [["config.json", "<sha256>"], ...]}         # every input file, sorted by path

Nothing local enters it (no path, cache name, host or time), so two stores
converting the same bytes with the same options compute the same identity,
and a shared origin can hand the result to other nodes by it.

The result directory carries ``cachemesh-convert.json``: the document above,
plus ``identity``, ``model`` (what the input is: model_type, architectures,
task) and ``runtime`` (what a runtime needs to load it: engine, class,
files). It is deterministic too; times, job ids and sources live in the job
record instead. A runtime detects a converted directory by this file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .base import Converter, ConvertOptions, ModelInput

FORMAT = "cachemesh-convert/1"
MANIFEST = "cachemesh-convert.json"


def identity_document(converter: Converter, options: ConvertOptions,
                      model: ModelInput) -> dict[str, Any]:
    inputs = model.files
    return {
        "format": FORMAT,
        "target": options.target,
        "converter": {
            "name": converter.name,
            "revision": converter.revision,
            "versions": dict(sorted(converter.versions(model).items())),
        },
        "options": options.identity_fields(),
        "inputs": [[path, inputs[path]] for path in sorted(inputs)],
    }


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def identity_of(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document)).hexdigest()


def write_manifest(out: Path, document: dict[str, Any], identity: str,
                   model: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    manifest = {**document, "identity": identity, "model": model, "runtime": runtime}
    (out / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a converted directory; None if it has none or it is unreadable."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None
