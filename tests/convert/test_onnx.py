"""ONNX conversion: onnxruntime on the converted graph matches the original model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachemesh.caches import Caches
from cachemesh.convert import Conversions, make_options, read_manifest
from cachemesh.errors import InvalidInputError

from . import models

ort = pytest.importorskip("onnxruntime")


def _session(view):
    return ort.InferenceSession(str(view / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("classifier", [True, False], ids=["sequence-classifier", "embedding"])
def test_encoder_matches_torch(caches: Caches, tmp_path, classifier: bool):
    origin, model = models.tiny_bert(tmp_path / "bert", classifier=classifier)
    result = Conversions(caches).convert(str(origin), make_options("onnx"))
    manifest = read_manifest(result.view)
    runtime = manifest["runtime"]
    assert manifest["model"]["task"] == ("text-classification" if classifier
                                         else "feature-extraction")
    assert (result.view / "config.json").is_file()

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 200, (4, 19), generator=g)  # shapes unlike the export's
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    names = [i["name"] for i in runtime["inputs"]]
    [got] = _session(result.view).run(None, {n: feed[n].numpy() for n in names})
    with torch.no_grad():
        out = model(**feed)
    want = (out.logits if classifier else out.last_hidden_state).numpy()
    if not classifier:
        keep = mask.numpy().astype(bool)
        got, want = got[keep], want[keep]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_sklearn_classifier_matches(caches: Caches, tmp_path):
    origin, model, x = models.digits_svm(tmp_path / "svm")
    result = Conversions(caches).convert(str(origin), make_options("onnx"))
    manifest = read_manifest(result.view)
    assert manifest["model"]["estimator"] == "SVC"
    assert manifest["runtime"]["inputs"] == [{"name": "input", "dtype": "float32",
                                              "shape": ["batch", 64]}]
    labels, scores = _session(result.view).run(None, {"input": x.astype(np.float32)})
    np.testing.assert_array_equal(labels, model.predict(x))
    assert scores.shape == (len(x), 10)


def test_skops_classifier_with_probabilities_and_a_regressor(caches: Caches, tmp_path):
    import joblib
    import skops.io as sio
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LinearRegression, LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    classifier = LogisticRegression(max_iter=300).fit(x[:400], y[:400])
    (tmp_path / "logreg").mkdir()
    sio.dump(classifier, tmp_path / "logreg" / "model.skops")
    regressor = LinearRegression().fit(x[:400], y[:400].astype(float))
    (tmp_path / "linreg").mkdir()
    joblib.dump(regressor, tmp_path / "linreg" / "model.pkl")
    conversions = Conversions(caches)
    sample = x[400:450].astype(np.float32)

    result = conversions.convert(str(tmp_path / "logreg"), make_options("onnx"))
    assert read_manifest(result.view)["model"]["task"] == "classification"
    labels, probabilities = _session(result.view).run(None, {"input": sample})
    np.testing.assert_array_equal(labels, classifier.predict(sample))
    np.testing.assert_allclose(probabilities, classifier.predict_proba(sample), atol=1e-5)

    result = conversions.convert(str(tmp_path / "linreg"), make_options("onnx"))
    assert read_manifest(result.view)["model"]["task"] == "regression"
    [predicted] = _session(result.view).run(None, {"input": sample})
    np.testing.assert_allclose(predicted.ravel(), regressor.predict(sample), rtol=1e-4, atol=1e-4)


def test_a_directory_with_two_estimators_is_refused(caches: Caches, tmp_path):
    import joblib
    from sklearn.dummy import DummyClassifier

    (tmp_path / "two").mkdir()
    for name in ("a.joblib", "b.joblib"):
        joblib.dump(DummyClassifier().fit([[0.0]], [0]), tmp_path / "two" / name)
    with pytest.raises(InvalidInputError, match="several scikit-learn model files"):
        Conversions(caches).convert(str(tmp_path / "two"), make_options("onnx"))
