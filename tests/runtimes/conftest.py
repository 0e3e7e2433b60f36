"""Converted models for the ctranslate2 and onnx runtimes, built once per session.

Each is a tiny model from ``tests/convert/models.py``, converted by the real
``cachemesh convert`` machinery into a store of the session's own (the
per-test CACHEMESH_HOME of ``clean_env`` would vanish after the first test).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachemesh.caches import Caches
from cachemesh.config import Settings
from tests.convert import models

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class Converted:
    view: Path  # the converted directory (a cache view)
    origin: Path  # the source model directory
    model: Any  # the source model, in memory (transformers or sklearn)
    extra: Any = None  # tokenizer, or sample inputs


@pytest.fixture(scope="session")
def convert_store(tmp_path_factory: pytest.TempPathFactory) -> Caches:
    home = tmp_path_factory.mktemp("convert-home")
    return Caches(Settings.from_env({"CACHEMESH_HOME": str(home)}))


def _convert(caches: Caches, origin: Path, to: str) -> Path:
    from cachemesh.convert import Conversions, make_options

    return Conversions(caches).convert(str(origin), make_options(to)).view


@pytest.fixture(scope="session")
def ct2_llama(tmp_path_factory: pytest.TempPathFactory, convert_store: Caches) -> Converted:
    """A tiny llama with a chat template, converted to CTranslate2 (float32)."""
    pytest.importorskip("ctranslate2")
    origin, model, tokenizer = models.tiny_llama(tmp_path_factory.mktemp("origin") / "llama")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(origin)
    return Converted(_convert(convert_store, origin, "ct2"), origin, model, tokenizer)


@pytest.fixture(scope="session")
def onnx_svm(tmp_path_factory: pytest.TempPathFactory, convert_store: Caches) -> Converted:
    """The digits SVM, converted to ONNX with skl2onnx; ``extra`` holds unseen digits."""
    pytest.importorskip("onnxruntime")
    origin, model, x = models.digits_svm(tmp_path_factory.mktemp("origin") / "svm")
    return Converted(_convert(convert_store, origin, "onnx"), origin, model, x)


@pytest.fixture(scope="session")
def onnx_bert(tmp_path_factory: pytest.TempPathFactory, convert_store: Caches) -> Converted:
    """A tiny BERT sequence classifier exported to ONNX (int64 inputs, dynamic axes)."""
    pytest.importorskip("onnxruntime")
    origin, model = models.tiny_bert(tmp_path_factory.mktemp("origin") / "bert", classifier=True)
    return Converted(_convert(convert_store, origin, "onnx"), origin, model)


def ort_session(view: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(view / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def loaded_ct2(ct2_llama: Converted) -> Iterator[Any]:
    """The ctranslate2 runtime with the tiny llama loaded, in this process."""
    from cachemesh.runtimes import ModelSettings, runtime_class

    runtime = runtime_class("ctranslate2")(ModelSettings(name="llama", path=ct2_llama.view))
    runtime.load()
    yield runtime
    # Unload before the interpreter exits: CTranslate2 4.x can abort ("terminate called
    # without an active exception") when a generator that sampled is destroyed at exit.
    runtime.unload()
