"""``--to ct2``: Hugging Face transformers models into CTranslate2's format.

CTranslate2 (CPU and GPU; int8, fp16, bf16 weights) is driven through its own
``TransformersConverter``; cachemesh adds the checks, the tokenizer files and
the manifest. The output directory::

    model.bin                CTranslate2's weights (quantized as asked)
    config.json              CTranslate2's model config (not the HF config.json)
    vocabulary.json          CTranslate2's vocabulary (token strings by id)
    tokenizer.json, …        the input's tokenizer and generation files, copied
    cachemesh-convert.json   the manifest (identity.py); runtime.class says which
                             CTranslate2 class loads it: Generator, Translator, Encoder;
                             runtime.context_length is the source config's position
                             limit (CTranslate2's config.json does not keep it)

Without ``--quantization`` the weights keep the checkpoint's type. Tensor
parallelism is CTranslate2's own business at load time
(``Generator(..., tensor_parallel=True)`` under MPI), so ``--tp`` is refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from .base import (
    Converter,
    ConvertOptions,
    ModelFacts,
    ModelInput,
    copy_side_files,
    dist_versions,
)

if TYPE_CHECKING:
    from ..jobs import JobRun

QUANTIZATIONS = (
    "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
    "float16", "bfloat16", "float32",
)
# CTranslate2 class that loads a converted model, by model_type. Everything
# else CTranslate2 converts is a decoder-only language model (Generator).
_ENCODERS = {"bert", "distilbert", "roberta", "xlm-roberta", "camembert"}
_SEQ2SEQ = {"bart", "marian", "m2m_100", "mbart", "pegasus", "t5", "mt5", "umt5", "whisper",
            "t5gemma", "t5gemma2"}


def _supported_config_classes() -> set[str] | None:
    """Config classes CTranslate2's transformers converter has a loader for.

    CTranslate2 keeps this table private (``_MODEL_LOADERS``); if a release
    renames it, return None and let the conversion itself say no.
    """
    try:
        from ctranslate2.converters import transformers as ct2_transformers
    except ImportError:
        return None
    loaders = getattr(ct2_transformers, "_MODEL_LOADERS", None)
    return set(loaders) if isinstance(loaders, dict) else None


def _config_class(model_type: str) -> str | None:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return None
    return CONFIG_MAPPING_NAMES.get(model_type)


class CTranslate2Converter(Converter):
    target = "ct2"
    name = "ctranslate2"
    revision = 2  # 2: runtime.context_length in the manifest

    def versions(self, model: ModelInput) -> dict[str, str]:
        # transformers loads the checkpoint for CTranslate2's converter.
        return dist_versions("ctranslate2", "transformers")

    def check_options(self, options: ConvertOptions) -> None:
        if options.tp is not None:
            raise InvalidInputError(
                "--tp applies to --to safetensors; CTranslate2 splits a model across GPUs itself"
                " when it loads it (tensor_parallel=True)"
            )
        q = options.quantization
        if q is not None and q not in QUANTIZATIONS:
            raise InvalidInputError(
                f"unknown --quantization {q!r} for --to ct2; one of: {', '.join(QUANTIZATIONS)}"
            )

    def check(self, model: ModelInput, options: ConvertOptions) -> ModelFacts:
        config = model.require_config("ct2")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise InvalidInputError(f"{model.source}: config.json has no model_type")
        supported = _supported_config_classes()
        config_class = _config_class(model_type)
        if supported is not None and config_class not in supported:
            names = sorted(c.removesuffix("Config").lower() for c in supported)
            raise InvalidInputError(
                f"{model.source}: CTranslate2 cannot convert model_type {model_type!r}"
                f" (it converts: {', '.join(names)})"
            )
        weights = [p for p in model.files if p.endswith((".safetensors", ".bin"))
                   and "/" not in p]
        if not weights:
            raise InvalidInputError(f"{model.source}: no weights (*.safetensors or *.bin) found")
        if not any(p in model.files for p in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                               "vocab.txt", "spiece.model")):
            raise InvalidInputError(
                f"{model.source}: no tokenizer files; CTranslate2 takes its vocabulary from the"
                " model's tokenizer"
            )
        if model_type in _ENCODERS:
            cls, task = "Encoder", "feature-extraction"
        elif model_type in _SEQ2SEQ:
            cls, task = "Translator", "text2text-generation"
        else:
            cls, task = "Generator", "text-generation"
        architectures = list(config.get("architectures") or [])
        extra: dict[str, Any] = {"ct2_class": cls}
        context = _context_length(config)
        if context is not None:
            extra["context_length"] = context
        return ModelFacts(model_type=model_type, architectures=architectures,
                          task=task, extra=extra)

    def convert(self, model: ModelInput, options: ConvertOptions, facts: ModelFacts,
                out: Path, run: JobRun) -> dict[str, Any]:
        from ctranslate2.converters import TransformersConverter

        run.progress(0.05, "loading the checkpoint and converting (CTranslate2)")
        converter = TransformersConverter(str(model.view), low_cpu_mem_usage=True)
        converter.convert(str(out), quantization=options.quantization, force=True)
        run.progress(0.85, "copying tokenizer files")
        copied = copy_side_files(model.view, out)
        run.log(f"copied {', '.join(copied) or 'no tokenizer files'}")
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        return {
            "engine": "ctranslate2",
            "class": facts.extra["ct2_class"],
            "quantization": options.quantization,  # None: the checkpoint's own type
            "files": files,
            "tokenizer": "tokenizer.json" if "tokenizer.json" in copied else None,
            "context_length": facts.extra.get("context_length"),
        }


def _context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the source model takes, from its config (names vary by family)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                "n_ctx"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
