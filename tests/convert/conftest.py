"""Fixtures for conversion tests: tiny models, built once per session, and a
fake converter beside the real ones."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cachemesh.convert import base
from cachemesh.convert.base import Converter, ConvertOptions, ModelFacts, ModelInput
from cachemesh.errors import InvalidInputError

from . import models


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory):
    return models.tiny_llama(tmp_path_factory.mktemp("origin") / "tiny-llama")


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    return models.tiny_gpt2(tmp_path_factory.mktemp("origin") / "tiny-gpt2")


@pytest.fixture(scope="session")
def bloom(tmp_path_factory: pytest.TempPathFactory):
    return models.tiny_bloom(tmp_path_factory.mktemp("origin") / "tiny-bloom")


class FakeConverter(Converter):
    """Counts its runs; can be slowed down or made to fail half-way."""

    target = "fake"
    name = "fake-converter"
    runs = 0
    delay = 0.0
    fail_after_partial = False
    lock = threading.Lock()

    def versions(self, model: ModelInput) -> dict[str, str]:
        return {"fake": "1.0"}

    def check_options(self, options: ConvertOptions) -> None:
        if options.tp is not None:
            raise InvalidInputError("fake takes no --tp")

    def check(self, model: ModelInput, options: ConvertOptions) -> ModelFacts:
        if "config.json" not in model.files:
            raise InvalidInputError("fake needs config.json")
        return ModelFacts(model_type="fake", task="testing")

    def convert(self, model: ModelInput, options: ConvertOptions, facts: ModelFacts,
                out: Path, run: Any) -> dict[str, Any]:
        with FakeConverter.lock:
            FakeConverter.runs += 1
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes((model.view / "config.json").read_bytes() * 3)
        run.progress(0.5, "half-way")
        time.sleep(FakeConverter.delay)
        if FakeConverter.fail_after_partial:
            run.log("about to fail", "warning")
            raise RuntimeError("the fake converter broke half-way")
        (out / "done.txt").write_text(options.quantization or "none")
        return {"engine": "fake"}


@pytest.fixture
def fake_converter(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(base.CONVERTERS, "fake", FakeConverter)
    monkeypatch.setattr(FakeConverter, "runs", 0)
    monkeypatch.setattr(FakeConverter, "delay", 0.0)
    monkeypatch.setattr(FakeConverter, "fail_after_partial", False)
    return FakeConverter
