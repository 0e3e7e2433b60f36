"""Runtimes in-process: sklearn (joblib, pickle, skops with a trusted-types policy),
custom classes, MLServer's model-settings.json, and plugins found by entry points."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn import datasets, svm
from sklearn.linear_model import LogisticRegression

from cachemesh.errors import InferenceInputError, ModelLoadError, UnknownRuntimeError
from cachemesh.runtimes import (
    ENTRY_POINT_GROUP,
    InferenceRequest,
    RequestedOutput,
    Runtime,
    Tensor,
    available,
    resolve,
    runtime_class,
)


@pytest.fixture(scope="module")
def digits():
    d = datasets.load_digits()
    x = d.images.reshape(len(d.images), -1) / 16.0
    clf = svm.SVC(gamma=0.001 * 16 * 16, C=100.0).fit(x[:500], d.target[:500])
    return clf, x, d.target


def load(path: Path, **params):
    resolved = resolve(path, parameters=params)
    model = runtime_class(resolved.runtime)(resolved.settings("m", path))
    model.load()
    return resolved, model


def ask(model, x, outputs=()):
    request = InferenceRequest([Tensor.of("x", x)], [RequestedOutput(o) for o in outputs])
    return {t.name: t for t in model.predict(request).outputs}


@pytest.mark.parametrize("filename", ["model.joblib", "model.pkl"])
def test_sklearn_joblib_and_pickle_predict(tmp_path: Path, digits, filename):
    clf, x, y = digits
    if filename.endswith(".pkl"):
        (tmp_path / filename).write_bytes(pickle.dumps(clf))
    else:
        joblib.dump(clf, tmp_path / filename)
    resolved, model = load(tmp_path)
    assert resolved.runtime == "sklearn" and "detected" in resolved.reason
    out = ask(model, x[600:610])["predict"]
    assert out.datatype == "INT64" and out.data.tolist() == clf.predict(x[600:610]).tolist()
    assert model.metadata()["inputs"][0]["shape"] == [-1, 64]
    with pytest.raises(InferenceInputError, match="3 features"):
        ask(model, np.zeros((1, 3)))
    with pytest.raises(InferenceInputError, match="no output 'predict_proba'"):
        ask(model, x[:1], ["predict_proba"])


def test_sklearn_untrusted_needs_skops_and_an_explicit_policy(tmp_path: Path, digits):
    import skops.io as sio

    _, x, y = digits
    clf = LogisticRegression(max_iter=200).fit(x[:300], y[:300])
    joblib.dump(clf, tmp_path / "model.joblib")
    with pytest.raises(ModelLoadError, match="only a .skops file"):
        load(tmp_path, trusted="false")
    (tmp_path / "model.joblib").unlink()
    sio.dump(clf, tmp_path / "model.skops")
    needed = sio.get_untrusted_types(file=tmp_path / "model.skops")
    if needed:  # this sklearn's types that skops does not trust by default
        with pytest.raises(ModelLoadError, match="not trusted"):
            load(tmp_path, trusted="false")
    _, model = load(tmp_path, trusted="false", trusted_types=needed)
    probs = ask(model, x[:2], ["predict_proba"])["predict_proba"]
    assert probs.shape == (2, 10) and probs.datatype == "FP64"


def test_mlserver_model_settings_are_accepted(tmp_path: Path, digits):
    clf, x, _ = digits
    joblib.dump(clf, tmp_path / "weights.joblib")
    joblib.dump(clf, tmp_path / "other.joblib")
    (tmp_path / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./weights.joblib", "version": "v3", "extra": {"k": 1}},
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]}))
    resolved, model = load(tmp_path)
    assert (resolved.runtime, resolved.version) == ("sklearn", "v3")
    assert resolved.parameters == {"uri": "./weights.joblib", "k": 1}
    assert model.metadata()["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    (tmp_path / "model-settings.json").write_text(json.dumps(
        {"implementation": "mlserver_xgboost.XGBoostModel"}))
    with pytest.raises(UnknownRuntimeError, match="no cachemesh runtime yet"):
        resolve(tmp_path)
    (tmp_path / "model-settings.json").write_text(json.dumps(
        {"parameters": {"uri": "../escape.joblib"}, "implementation": "mlserver_sklearn.SKLearnModel"}))
    with pytest.raises(Exception, match="outside the model directory"):
        load(tmp_path)


def test_custom_implementation_in_model_settings_maps_to_the_custom_runtime(tmp_path: Path):
    for name, answer in (("a", 1), ("b", 2)):  # two models that both ship model.py
        d = tmp_path / name
        d.mkdir()
        (d / "model.py").write_text(textwrap.dedent(f"""
            from cachemesh.runtimes import Runtime, InferenceResponse, Tensor
            class Mine(Runtime):
                def predict(self, request):
                    return InferenceResponse([Tensor.of("answer", [{answer}])])
        """))
        (d / "model-settings.json").write_text(json.dumps({"implementation": "model.Mine"}))
    answers = []
    for name in ("a", "b"):
        resolved, model = load(tmp_path / name)
        assert resolved.runtime == "custom" and resolved.parameters["class"] == "model.Mine"
        answers.append(ask(model, [0])["answer"].data.tolist())
    assert answers == [[1], [2]]


def test_custom_class_must_subclass_runtime(tmp_path: Path):
    (tmp_path / "bad.py").write_text("class NotARuntime:\n    pass\n")
    custom = runtime_class("custom")
    with pytest.raises(ModelLoadError, match="does not subclass"):
        custom(resolve(tmp_path, "custom", {"class": "bad:NotARuntime"}).settings("m", tmp_path))
    with pytest.raises(ModelLoadError, match="cannot import"):
        custom(resolve(tmp_path, "custom", {"class": "missing:Thing"}).settings("m", tmp_path))


def test_nothing_to_detect_and_unknown_names(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnknownRuntimeError, match="cannot tell which runtime"):
        resolve(tmp_path)
    with pytest.raises(UnknownRuntimeError, match="unknown runtime 'tensorflow'"):
        resolve(tmp_path, "tensorflow")


def test_a_plugin_runtime_is_found_through_entry_points(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    (site / "toyplugin").mkdir(parents=True)
    (site / "toyplugin" / "__init__.py").write_text(textwrap.dedent("""
        from cachemesh.runtimes import Runtime
        class Plugged(Runtime):
            name = "plugged"
            @classmethod
            def detect(cls, path):
                return 90 if (path / "plugged.cfg").exists() else 0
    """))
    dist = site / "toyplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nplugged = toyplugin:Plugged\nsklearn = toyplugin:Plugged\n")
    monkeypatch.syspath_prepend(str(site))
    assert available()["plugged"] == "toyplugin:Plugged"
    # a plugin cannot take a built-in name
    assert available()["sklearn"] == "cachemesh.runtimes.sklearn:SKLearnRuntime"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "plugged.cfg").write_text("")
    assert resolve(tmp_path / "model").runtime == "plugged"
    assert issubclass(runtime_class("plugged"), Runtime)
    sys.modules.pop("toyplugin", None)


def test_optional_hooks_are_detected():
    class Gen(Runtime):
        def generate(self, payload):
            return payload

    assert Gen.supports("generate") and not Gen.supports("stream")
    assert not Runtime.supports("generate")


def test_tensor_of_picks_datatypes():
    assert Tensor.of("a", np.array([1.5], dtype=np.float16)).datatype == "FP16"
    t = Tensor.of("s", np.array(["x", "yz"]))
    assert t.datatype == "BYTES" and t.data.tolist() == [b"x", b"yz"]
    assert Tensor.of("b", [True]).datatype == "BOOL"


def test_public_names_of_runtimes_and_serve_exist():
    import cachemesh.runtimes as runtimes
    import cachemesh.serve as serve

    for module in (runtimes, serve):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
