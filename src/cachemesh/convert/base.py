"""The converter interface, and the registry binding ``--to`` targets to converters.

A converter turns one model directory (a cache view, read-only) into a new
directory. It never writes into its input, and writes its output only into
the empty staging directory it is given; the service (``service.py``) adds the
manifest, stores the result as a cache and removes the staging directory, so
a converter that fails leaves nothing behind. A new target is one small module::

    class MyConverter(Converter):
        target = "mine"
        name = "my-tool"

        def versions(self) -> dict[str, str]: ...        # what shapes the output bytes
        def check(self, model, options) -> ModelFacts: ... # refuse what it cannot convert
        def convert(self, model, options, out, run) -> dict: ...

``check`` runs before any job is created and must be cheap (read config.json,
never load weights): an input it refuses is the user's mistake (exit 2), not a
failed job. A fake converter beside the real ones lives in the tests.
"""

from __future__ import annotations

import importlib
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..jobs import JobRun

# --to target -> "module:Class" (imported on first use: torch, ctranslate2 and
# onnx load only for the target that needs them), or the class itself.
CONVERTERS: dict[str, str | type[Converter]] = {
    "ct2": "cachemesh.convert.ct2:CTranslate2Converter",
    "onnx": "cachemesh.convert.onnx:OnnxConverter",
    "safetensors": "cachemesh.convert.tp:TensorParallelSplitter",
}
# A GGUF input is first turned into a Hugging Face folder by this converter (its
# ``--to safetensors``); service.py runs the asked target on that folder.
GGUF_CONVERTER = "cachemesh.convert.gguf_model:GGUFConverter"
# --dtype: what a GGUF's weights are stored as once dequantized.
GGUF_DTYPES = ("float32", "bfloat16", "float16")

# Files a runtime needs beside the weights to tokenize and to stop generating.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class ConvertOptions:
    """What the user asked for. Part of the conversion's identity."""

    target: str
    quantization: str | None = None
    tp: int | None = None
    dtype: str | None = None  # the weights' type when a GGUF is dequantized

    def identity_fields(self) -> dict[str, Any]:
        """The options as they enter the identity: only those that were set."""
        return {k: v for k, v in (("quantization", self.quantization), ("tp", self.tp),
                                  ("dtype", self.dtype)) if v is not None}

    def label(self) -> str:
        """A short human label: ``ct2-int8``, ``onnx``, ``safetensors-tp4``,
        ``safetensors-bfloat16``."""
        parts = [self.target]
        if self.quantization:
            parts.append(self.quantization.replace("_", ""))
        if self.tp:
            parts.append(f"tp{self.tp}")
        if self.dtype:
            parts.append(self.dtype)
        return "-".join(parts)


@dataclass
class ModelInput:
    """The input of a conversion: an Available cache, held open while it runs."""

    cache: str
    source: str
    view: Path
    files: dict[str, str]  # relative path -> sha256, every file of the cache

    def config(self) -> dict[str, Any] | None:
        """config.json, parsed; None if the model has none."""
        path = self.view / "config.json"
        if "config.json" not in self.files or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInputError(f"{path} is not a JSON object")
        return data

    def require_config(self, target: str) -> dict[str, Any]:
        config = self.config()
        if config is None:
            raise InvalidInputError(
                f"{self.source} (cache {self.cache!r}) has no config.json: --to {target} needs a"
                " Hugging Face transformers model directory"
            )
        return config


@dataclass
class ModelFacts:
    """What ``check`` learned about the input; written to the manifest's ``model``."""

    model_type: str | None = None
    architectures: list[str] = field(default_factory=list)
    task: str | None = None  # text-generation, text-classification, feature-extraction, …
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": self.model_type, "architectures": self.architectures,
                               "task": self.task}
        out.update(self.extra)
        return out


class Converter(ABC):
    """Turns a model directory into an accelerated form. Instances are cheap."""

    #: the ``--to`` value
    target: ClassVar[str]
    #: what does the work, as the manifest names it ("ctranslate2")
    name: ClassVar[str]
    #: bump when cachemesh's own conversion code changes what it writes, so
    #: that results converted by the old code are not taken for the new ones
    revision: ClassVar[int] = 1

    @abstractmethod
    def versions(self, model: ModelInput) -> dict[str, str]:
        """Versions of the libraries that shape the output bytes for this input (part
        of the identity). Cheap: read with :func:`dist_versions`, never by importing."""

    def check_options(self, options: ConvertOptions) -> None:
        """Refuse options this target does not take (before the input is pulled)."""
        if options.quantization is not None:
            raise InvalidInputError(f"--to {self.target} takes no --quantization")
        if options.tp is not None:
            raise InvalidInputError(
                f"--tp applies to --to safetensors (pre-split shards), not --to {self.target}"
            )

    @abstractmethod
    def check(self, model: ModelInput, options: ConvertOptions) -> ModelFacts:
        """Refuse an input this converter cannot handle, cheaply, with a clear message."""

    @abstractmethod
    def convert(self, model: ModelInput, options: ConvertOptions, facts: ModelFacts,
                out: Path, run: JobRun) -> dict[str, Any]:
        """Write the converted model into ``out`` (absent or empty; create it).

        Returns what a runtime needs to know to load it (the manifest's ``runtime``).
        Raise on failure; report progress and notes through ``run``.
        """


def dist_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of these distributions, without importing them (a cache
    hit must not pay for importing torch). Missing ones are left out."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in distributions:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def get_converter(target: str) -> Converter:
    entry = CONVERTERS.get(target)
    if entry is None:
        known = ", ".join(sorted(CONVERTERS))
        raise InvalidInputError(f"unknown conversion target {target!r}; --to takes one of: {known}")
    extra = {"ct2": "ct2", "onnx": "onnx"}.get(target, "transformers")
    return _instance(entry, f"--to {target}", extra)


def gguf_converter() -> Converter:
    """The converter that turns a GGUF input into a Hugging Face folder."""
    return _instance(GGUF_CONVERTER, "a GGUF input", "gguf")


def _instance(entry: str | type[Converter], what: str, extra: str) -> Converter:
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidInputError(
                f"{what} needs packages that are not installed ({exc.name or exc});"
                f" install cachemesh[{extra}]"
            ) from None
        entry = getattr(module, class_name)
    return entry()


def gguf_file(model: ModelInput) -> str | None:
    """The GGUF file a model input is, if it is one: a cache without config.json holding
    exactly one ``.gguf`` at its top (several: the user must pick one)."""
    found = sorted(p for p in model.files if p.lower().endswith(".gguf") and "/" not in p)
    if not found or "config.json" in model.files:
        return None
    if len(found) > 1:
        raise InvalidInputError(
            f"{model.source} holds {len(found)} GGUF files ({', '.join(found[:4])}"
            f"{', …' if len(found) > 4 else ''}); convert one: give its path, or pull with"
            " --include NAME.gguf")
    return found[0]


def copy_side_files(src: Path, out: Path, names: tuple[str, ...] | list[str] = TOKENIZER_FILES,
                    *, rename: dict[str, str] | None = None) -> list[str]:
    """Copy the tokenizer and generation files that exist in ``src`` to ``out``.

    ``copyfile``, not ``copy2``: a staged file must carry a fresh mtime, or
    ``gc`` would take it for an abandoned temporary file.
    """
    copied = []
    for name in names:
        source = src / name
        if source.is_file():
            target = out / (rename or {}).get(name, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(target.name)
    return copied
