"""The onnx runtime served by a real server, asked by tritonclient and httpx.

Answers are compared with onnxruntime run directly on the same file and with
the source models (the digits SVM in scikit-learn, a tiny BERT in torch).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

from cachemesh.errors import InvalidInputError, ModelLoadError
from cachemesh.runtimes import ModelSettings, resolve, runtime_class
from cachemesh.serve.core.registry import ModelSpec
from tests.runtimes.conftest import Converted, ort_session
from tests.serve.conftest import RunningServer, serve_settings

pytest.importorskip("onnxruntime")
th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException


def handmade_graphs(root: Path) -> dict[str, Path]:
    """Two graphs built node by node: strings in and out, and a fixed batch of 2."""
    import onnx
    from onnx import TensorProto, helper

    def save(name: str, node, inputs, outputs) -> Path:
        graph = helper.make_graph([node], name, inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        (root / name).mkdir(parents=True)
        onnx.save(model, root / name / "model.onnx")
        return root / name

    return {
        # (StringNormalizer would be nicer, but it needs the en_US.UTF-8 locale installed.)
        "strings": save("strings", helper.make_node("Identity", ["text"], ["same"]),
                        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
                        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"])]),
        "fixed": save("fixed", helper.make_node("Relu", ["x"], ["y"]),
                      [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
                      [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])]),
        # time first, as recurrent models have it: rows of two requests must not be stacked
        "sequence": save("sequence", helper.make_node("Relu", ["x"], ["y"]),
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["sequence", "batch_size", 3])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                        ["sequence", "batch_size", 3])]),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, onnx_svm: Converted,
           onnx_bert: Converted) -> Iterator[RunningServer]:
    graphs = handmade_graphs(tmp_path_factory.mktemp("graphs"))
    specs = [ModelSpec(name="svm", source=str(onnx_svm.view), eager=True),
             ModelSpec(name="bert", source=str(onnx_bert.view), eager=True),
             *(ModelSpec(name=name, source=str(graphs[name]), eager=True)
               for name in ("strings", "fixed"))]
    with RunningServer(serve_settings(tmp_path_factory.mktemp("home")), specs) as running:
        running.wait_ready()
        yield running


@pytest.fixture
def triton(server: RunningServer) -> Iterator[th.InferenceServerClient]:
    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def infer(server: RunningServer, model: str, body: dict):
    return server.client.post(f"/v2/models/{model}/infer", content=orjson.dumps(body))


@pytest.mark.slow
def test_converted_directories_are_detected(onnx_svm: Converted, onnx_bert: Converted):
    for converted in (onnx_svm, onnx_bert):
        resolved = resolve(converted.view)
        assert resolved.runtime == "onnx", resolved.reason
    # The sklearn origin stays sklearn's.
    assert resolve(onnx_svm.origin).runtime == "sklearn"


@pytest.mark.slow
def test_metadata_comes_from_the_graph(triton, server: RunningServer):
    meta = triton.get_model_metadata("svm")
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["label"] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert outputs["probabilities"]["datatype"] == "FP32"
    bert = triton.get_model_metadata("bert")
    assert bert["inputs"] == [{"name": n, "datatype": "INT64", "shape": [-1, -1]}
                              for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert bert["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    # Measured sizes are the models', not onnxruntime's (imported before the load).
    for name in ("svm", "bert"):
        size = server.client.get(f"/api/v1/models/{name}").json()["size_bytes"]
        assert 0 < size < 50 * 2**20, (name, size)


@pytest.mark.slow
def test_svm_answers_like_sklearn_and_onnxruntime(triton, onnx_svm: Converted):
    x = onnx_svm.extra.astype(np.float32)
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = triton.infer("svm", [inp], outputs=[th.InferRequestedOutput("label"),
                                                 th.InferRequestedOutput("probabilities")])
    np.testing.assert_array_equal(result.as_numpy("label"), onnx_svm.model.predict(x))
    labels, scores = ort_session(onnx_svm.view).run(None, {"input": x})
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), scores, rtol=1e-6)
    # Only what was asked for comes back.
    result = triton.infer("svm", [inp], outputs=[th.InferRequestedOutput("label")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]


@pytest.mark.slow
def test_bert_answers_like_torch_with_padding(triton, onnx_bert: Converted):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 200, size=(3, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    inputs = []
    for name, array in feed.items():
        inp = th.InferInput(name, list(array.shape), "INT64")
        inp.set_data_from_numpy(array, binary_data=False)  # JSON data, this time
        inputs.append(inp)
    logits = triton.infer("bert", inputs).as_numpy("logits")
    with torch.no_grad():
        want = onnx_bert.model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)


@pytest.mark.slow
def test_strings_and_fixed_shapes(triton, server: RunningServer):
    meta = triton.get_model_metadata("strings")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "same", "datatype": "BYTES", "shape": [-1]}]
    text = np.array(["Caf\u00e9 \U0001f642", "", "abc"], dtype=object)
    inp = th.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(text, binary_data=True)
    got = triton.infer("strings", [inp]).as_numpy("same")
    assert [v.decode() for v in got] == list(text)
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\u00e9t\u00e9"]}]}
    assert infer(server, "strings", body).json()["outputs"][0]["data"] == ["\u00e9t\u00e9"]
    inp.set_data_from_numpy(np.array([b"ok", b"\xff\xfe", b""], dtype=object))
    with pytest.raises(InferenceServerException, match="element 1 is not UTF-8"):
        triton.infer("strings", [inp])

    assert triton.get_model_metadata("fixed")["inputs"] == [
        {"name": "x", "datatype": "FP64", "shape": [2, 3]}]
    x = [[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]]
    body = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 3], "data": x}]}
    r = infer(server, "fixed", body)
    assert r.json()["outputs"][0]["data"] == [0.0, 2.0, 0.0, 4.0, 0.0, 6.0]
    body["inputs"][0].update(shape=[1, 3], data=x[0])
    r = infer(server, "fixed", body)
    assert r.status_code == 400 and "the model takes [2, 3]" in r.json()["error"]


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_rows(server: RunningServer, onnx_svm: Converted):
    x = onnx_svm.extra.astype(np.float32)
    want = onnx_svm.model.predict(x)

    def ask(i: int) -> list[int]:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                            "data": x[2 * i:2 * i + 2].ravel().tolist()}],
                "outputs": [{"name": "label"}]}
        r = infer(server, "svm", body)
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(x) // 2)))
    assert [v for a in answers for v in a] == want[:2 * len(answers)].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("inputs, outputs, message", [
    ([{"name": "x", "datatype": "FP32", "shape": [1, 64]}], None,
     "missing input 'input'; unknown input 'x'"),
    ([{"name": "input", "datatype": "FP64", "shape": [1, 64]}], None,
     "input 'input' is FP32, got FP64"),
    ([{"name": "input", "datatype": "FP32", "shape": [1, 63]}], None,
     "has shape \\[1, 63\\], the model takes \\[-1, 64\\]"),
    ([{"name": "input", "datatype": "FP32", "shape": [64]}], None, "has shape \\[64\\]"),
    ([{"name": "input", "datatype": "FP32", "shape": [1, 64]}], [{"name": "proba"}],
     "no output 'proba'"),
])
def test_bad_inputs_are_the_clients_fault(server: RunningServer, inputs, outputs, message):
    for t in inputs:
        t["data"] = [0.5] * int(np.prod(t["shape"]))
    body = {"inputs": inputs, **({"outputs": outputs} if outputs else {})}
    r = infer(server, "svm", body)
    assert r.status_code == 400, r.text
    assert re.search(message, r.json()["error"]), r.json()["error"]
    # and the model still answers
    ok = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    assert infer(server, "svm", ok).status_code == 200


@pytest.mark.slow
def test_bert_missing_input_names_what_it_takes(server: RunningServer):
    body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 4],
                        "data": [1, 2, 3, 4]}]}
    r = infer(server, "bert", body)
    assert r.status_code == 400
    assert "missing inputs 'attention_mask', 'token_type_ids'" in r.json()["error"]


def test_model_files_and_parameters(onnx_svm: Converted, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch):
    def load(path: Path, **params):
        runtime = runtime_class("onnx")(ModelSettings(name="m", path=path, parameters=params))
        runtime.load()
        return runtime

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(onnx_svm.view / "model.onnx", plain / "digits.onnx")  # no manifest, other name
    assert resolve(plain).runtime == "onnx"
    runtime = load(plain, threads="3")
    assert runtime.session.get_session_options().intra_op_num_threads == 3
    assert runtime.batchable  # a dynamic first dimension everywhere
    # Without a threads parameter: the worker's budget (the server sets OMP_NUM_THREADS).
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert load(plain).session.get_session_options().intra_op_num_threads == 2
    graphs = handmade_graphs(tmp_path / "graphs")
    assert not load(graphs["fixed"]).batchable  # a batch of 2, always
    assert not load(graphs["sequence"]).batchable
    assert load(graphs["strings"]).batchable  # a first dimension named "n"
    assert not load(plain, batchable="false").batchable
    shutil.copy(onnx_svm.view / "model.onnx", plain / "other.onnx")
    with pytest.raises(ModelLoadError, match="several ONNX files"):
        load(plain)
    assert load(plain, uri="other.onnx").file == plain / "other.onnx"
    with pytest.raises(InvalidInputError, match="outside the model directory"):
        load(plain, uri="../plain/../../x.onnx")
    with pytest.raises(InvalidInputError, match="threads must be an integer"):
        load(plain, uri="other.onnx", threads="many")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load model.onnx"):
        load(tmp_path / "broken")


def test_metadata_is_read_from_the_file_before_any_load(tmp_path: Path, onnx_svm: Converted,
                                                        onnx_bert: Converted):
    """V2 metadata before the first load (issue 21): read from the graph without
    onnxruntime, and the same as what the loaded model says (stable across the load)."""
    from cachemesh.runtimes.onnx_signature import read_signature

    graphs = handmade_graphs(tmp_path / "graphs")
    cls = runtime_class("onnx")
    for view in (onnx_svm.view, onnx_bert.view, *graphs.values()):
        settings = ModelSettings(name="m", path=view)
        before = cls.describe(settings)
        runtime = cls(settings)
        runtime.load()
        assert before == runtime.metadata(), view
    assert cls.describe(ModelSettings(name="m", path=onnx_svm.view))["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    # Not an ONNX file, or a cut one: no signature (the load says why).
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    assert read_signature(tmp_path / "junk.onnx") is None
    whole = (onnx_bert.view / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[: len(whole) // 2])
    assert read_signature(tmp_path / "cut.onnx") is None
