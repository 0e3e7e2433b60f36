"""KServe V2 over REST, spoken by real clients (httpx, tritonclient.http) to a real server."""

from __future__ import annotations

import base64
import gzip

import numpy as np
import orjson
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.serve.conftest import RunningServer

ALL_TYPES = {
    "BOOL": [True, False, True, True],
    "UINT8": [0, 1, 255, 7], "UINT16": [0, 65535, 2, 3], "UINT32": [0, 2**32 - 1, 1, 2],
    "UINT64": [0, 2**64 - 1, 1, 2],
    "INT8": [-128, 127, 0, 1], "INT16": [-32768, 32767, 0, 1], "INT32": [-2**31, 2**31 - 1, 0, 1],
    "INT64": [-2**63, 2**63 - 1, 0, 1],
    "FP16": [0.5, -1.25, 2.0, 3.5], "FP32": [0.1, -1.5, 3.25, 1e30], "FP64": [0.1, -1e300, 2.5, 1.0],
    "BYTES": ["a", "héllo", "", "x y"],
}


def infer(server: RunningServer, model: str, body: dict | bytes, **kw):
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return server.client.post(f"/v2/models/{model}/infer", content=content, **kw)


def test_server_metadata_health_and_model_metadata(v2: RunningServer):
    assert v2.client.get("/v2").json()["extensions"] == [
        "model_repository", "binary_tensor_data", "parameters"]
    assert v2.client.get("/v2/health/live").json() == {"live": True}
    assert v2.client.get("/v2/health/ready").json() == {"ready": True}
    meta = v2.client.get("/v2/models/digits").json()
    assert meta["platform"] == "sklearn"
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 64]}]
    assert meta["outputs"][0]["datatype"] == "INT64"
    assert v2.client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    # versions: only the one the model has
    assert v2.client.get("/v2/models/digits-v/versions/7").json()["versions"] == ["7"]
    assert v2.client.get("/v2/models/digits-v/versions/8").status_code == 404
    assert v2.client.get("/v2/models/digits/versions/1/ready").status_code == 404
    assert v2.client.get("/v2/models/nope").json() == {"error": "no model named 'nope'"}
    # the control API documents itself on the same port
    assert "/api/v1/models" in v2.client.get("/openapi.json").json()["paths"]
    assert v2.client.get("/docs").status_code == 200


def test_docs_pages_load_nothing_from_elsewhere_and_describe_v2(v2: RunningServer):
    """/docs and /redoc work offline: every file they load is served here."""
    import re

    from starlette.routing import Route

    from cachemesh.serve.adapters import v2_rest

    for page in ("/docs", "/redoc"):
        html = v2.client.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        urls += re.findall(r"""url: ?["']([^"']+)["']""", html)
        assert urls, html
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), (page, url)
            assert v2.client.get(url).status_code == 200, url
        assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    doc = v2.client.get("/openapi.json").json()
    for route in v2_rest.routes():
        assert isinstance(route, Route)
        described = doc["paths"].get(route.path)
        assert described, route.path
        assert {m.lower() for m in route.methods} - {"head"} <= set(described), route.path
    infer = doc["paths"]["/v2/models/{model}/infer"]["post"]
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"inputs", "outputs", "id", "parameters"} <= set(schema["properties"])


def test_digits_predictions_are_right(v2: RunningServer, digits_data):
    x, y = digits_data
    body = {"id": "r-1", "inputs": [{"name": "predict", "shape": [8, 64], "datatype": "FP32",
                                     "data": x[:8].tolist()}]}  # nested data
    r = infer(v2, "digits", body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "r-1" and doc["model_name"] == "digits"
    assert doc["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [8],
                               "data": y[:8].tolist()}]
    # flat data, a version in the path, and no Content-Type header at all
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64",
                        "data": x[5].astype(float).tolist()}]}
    r = v2.client.post("/v2/models/digits-v/versions/7/infer", content=orjson.dumps(body),
                       headers={"content-type": ""})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [int(y[5])]
    assert r.json()["model_version"] == "7"


def test_predict_proba_is_an_output_by_name(v2: RunningServer, digits_data):
    x, _ = digits_data
    body = {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": x[:2].tolist()}],
            "outputs": [{"name": "decision_function"}]}
    r = infer(v2, "digits", body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [2, 10]
    body["outputs"] = [{"name": "predict_proba"}]  # SVC(probability=False) has none
    r = infer(v2, "digits", body)
    assert r.status_code == 400 and "predict_proba" in r.json()["error"]


@pytest.mark.parametrize("datatype", sorted(ALL_TYPES))
def test_every_datatype_round_trips(v2: RunningServer, datatype: str):
    values = ALL_TYPES[datatype]
    nested = [values[:2], values[2:]]
    r = infer(v2, "echo", {"inputs": [{"name": "t", "shape": [2, 2], "datatype": datatype,
                                       "data": nested}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("t", datatype, [2, 2])
    if datatype in ("FP16", "FP32"):
        np.testing.assert_allclose(out["data"], np.array(values, dtype=datatype.lower().replace(
            "fp", "float")), rtol=1e-3)
    else:
        assert out["data"] == values
    assert r.json()["parameters"] == {"echoed": 1}


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]},
     "needs 4 values, data has 3"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "FP99", "data": [1]}]}, "unknown datatype"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "INT32", "data": [1.5]}]},
     "must be integers"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "UINT8", "data": [256]}]}, "out of range"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": ["x"]}]}, "must be numbers"),
    ({"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]},
     "not a regular array"),
    ({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32"}]}, "has no data"),
    ({"inputs": []}, "non-empty list 'inputs'"),
    ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "needs a 'name'"),
    ({"inputs": [{"name": "t", "shape": "1", "datatype": "FP32", "data": [1]}]}, "shape must be"),
])
def test_malformed_requests_are_400_naming_the_problem(v2: RunningServer, body, fragment):
    r = infer(v2, "echo", body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_errors_the_runtime_detects_are_4xx_and_model_faults_5xx(v2: RunningServer):
    r = infer(v2, "digits", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                         "data": [0, 0, 0]}]})
    assert r.status_code == 400
    assert "3 features" in r.json()["error"] and "64" in r.json()["error"]
    t = {"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}
    r = infer(v2, "echo", {"inputs": [t], "parameters": {"fail": "input"}})
    assert r.status_code == 400 and r.json() == {"error": "the toy rejects this request"}
    r = infer(v2, "echo", {"inputs": [t], "parameters": {"fail": "model"}})
    assert r.status_code == 500
    assert r.json()["error"] == "ZeroDivisionError: the toy divided by zero"
    assert infer(v2, "echo", b"{not json").status_code == 400
    assert infer(v2, "missing", {"inputs": [t]}).status_code == 404


def test_grpc_json_contents_form_gets_the_same_form_back(v2: RunningServer, digits_data):
    x, y = digits_data
    body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32",
                        "contents": {"fp32_contents": x[3].tolist()}}]}
    r = infer(v2, "digits", body)
    assert r.status_code == 200, r.text
    assert r.json() == {"modelName": "digits", "outputs": [{
        "name": "predict", "datatype": "INT64", "shape": ["1"],
        "contents": {"int64Contents": [str(y[3])]}}]}
    # camelCase in, int64 given as strings, bytes as base64
    body = {"inputs": [
        {"name": "a", "shape": ["2"], "datatype": "INT64", "contents": {"int64Contents": ["-5", "9"]}},
        {"name": "b", "shape": [1], "datatype": "BYTES",
         "contents": {"bytesContents": [base64.b64encode(b"\x00\xff").decode()]}},
        {"name": "c", "shape": [2], "datatype": "BOOL", "contents": {"boolContents": [True, False]}},
    ]}
    r = infer(v2, "echo", body)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["a"]["contents"] == {"int64Contents": ["-5", "9"]}
    assert base64.b64decode(outs["b"]["contents"]["bytesContents"][0]) == b"\x00\xff"
    assert outs["c"]["contents"] == {"boolContents": [True, False]}
    assert r.json()["parameters"] == {"echoed": {"int64Param": "3"}}
    bad = {"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "contents": {"int64Contents": [1]}}]}
    r = infer(v2, "echo", bad)
    assert r.status_code == 400 and "fp32_contents" in r.json()["error"]


def test_gzip_body_and_binary_extension_by_hand(v2: RunningServer):
    body = {"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    r = infer(v2, "echo", gzip.compress(orjson.dumps(body)), headers={"content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.0, 2.0]
    raw = np.array([[1, 2], [3, 4]], dtype=np.int16).tobytes()
    words = b"".join(len(w).to_bytes(4, "little") + w for w in (b"ab", b"", b"xyz"))
    head = orjson.dumps({
        "inputs": [{"name": "n", "shape": [2, 2], "datatype": "INT16",
                    "parameters": {"binary_data_size": len(raw)}},
                   {"name": "w", "shape": [3], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(words)}}],
        "outputs": [{"name": "n", "parameters": {"binary_data": True}}, {"name": "w"}]})
    r = infer(v2, "echo", head + raw + words,
              headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    doc = orjson.loads(r.content[:n])
    outs = {o["name"]: o for o in doc["outputs"]}
    assert outs["n"]["parameters"] == {"binary_data_size": 8} and "data" not in outs["n"]
    assert r.content[n:] == raw
    assert outs["w"]["data"] == ["ab", "", "xyz"]
    r = infer(v2, "echo", head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "runs past the end" in r.json()["error"]


def test_tritonclient_http_unchanged(v2: RunningServer, digits_data):
    x, y = digits_data
    client = th.InferenceServerClient(v2.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.get_model_metadata("digits")["platform"] == "sklearn"
        inp = th.InferInput("predict", [4, 64], "FP32")
        inp.set_data_from_numpy(x[10:14])  # binary input by default
        result = client.infer("digits", [inp])  # no outputs named: binary_data_output
        assert result.as_numpy("predict").tolist() == y[10:14].tolist()
        inp.set_data_from_numpy(x[10:14], binary_data=False)
        out = th.InferRequestedOutput("predict", binary_data=False)
        result = client.infer("digits", [inp], outputs=[out], request_id="42")
        assert result.as_numpy("predict").tolist() == y[10:14].tolist()
        assert result.get_response()["id"] == "42"
        # every datatype through the binary extension, both ways
        for dt, values in ALL_TYPES.items():
            arr = np.array(values, dtype=object if dt == "BYTES" else th_dtype(dt))
            if dt == "BYTES":
                arr = np.array([v.encode() for v in values], dtype=object)
            t = th.InferInput("t", [4], dt)
            t.set_data_from_numpy(arr)
            got = client.infer("echo", [t], outputs=[th.InferRequestedOutput("t")]).as_numpy("t")
            assert got.tolist() == arr.tolist(), dt
        bad = th.InferInput("predict", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException, match="3 features"):
            client.infer("digits", [bad])
        index = client.get_model_repository_index()
        assert {"name": "digits", "state": "READY"} in index
        client.unload_model("echo")
        assert not client.is_model_ready("echo")
        client.load_model("echo")
        assert client.is_model_ready("echo")
    finally:
        client.close()


def th_dtype(dt: str):
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(dt)


def test_generate_and_stream_hooks_reach_the_runtime(v2: RunningServer):
    import asyncio

    service = v2.service
    loop = v2.server._loop

    async def both():
        text = await service.generate("chatty", {"prompt": "hello world"})
        chunks = [c async for c in service.stream("chatty", {"prompt": "a b c"})]
        return text, chunks

    text, chunks = asyncio.run_coroutine_threadsafe(both(), loop).result(30)
    assert text == {"text": "HELLO WORLD"}
    assert chunks == [{"token": "a"}, {"token": "b"}, {"token": "c"}]


def test_concurrent_requests_each_get_their_own_answer(v2: RunningServer, digits_data):
    """Requests that reach the worker together are predicted in one call (batching):
    every answer must still be the one for its own rows, errors included."""
    import asyncio

    import httpx

    x, y = digits_data

    async def go():
        async with httpx.AsyncClient(base_url=v2.url, timeout=30) as c:
            async def one(i: int):
                rows = 1 + i % 3
                feats = 3 if i % 7 == 6 else 64  # some requests are wrong
                data = x[i:i + rows, :feats].tolist()
                r = await c.post("/v2/models/digits/infer", json={"inputs": [
                    {"name": "x", "shape": [rows, feats], "datatype": "FP32", "data": data}]})
                return i, rows, feats, r
            return await asyncio.gather(*(one(i) for i in range(96)))

    for i, rows, feats, r in asyncio.run(go()):
        if feats == 3:
            assert r.status_code == 400 and "3 features" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == y[i:i + rows].tolist()


def test_metrics_cover_requests_loads_memory_and_workers(v2: RunningServer):
    body = {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]}
    assert infer(v2, "echo", body).status_code == 200
    text = v2.client.get("/metrics").text
    for series in ('cachemesh_requests_total{model="echo",outcome="ok"}',
                   'cachemesh_request_duration_seconds_bucket{le="0.005",model="echo"}',
                   'cachemesh_inflight_requests{model="echo"} 0.0',
                   'cachemesh_model_hits_total{model="echo"}',
                   'cachemesh_model_load_seconds_count{model="echo"}',
                   "cachemesh_load_queue_delay_seconds_count",
                   "cachemesh_loaded_models", "cachemesh_memory_budget_bytes 4.294967296e+09",
                   "cachemesh_memory_held_bytes", 'cachemesh_model_bytes{model="digits"}',
                   'cachemesh_worker_rss_bytes{worker="1"}'):
        assert series in text, series


HUGE = 4611686018427387904  # 2**62: a zero-size tensor named with it was a 500


def _binary(head: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(head)
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("shape, fragment", [
    ([HUGE, HUGE, 0], "more elements than"),
    ([0, 2**40], "more elements than"),
    ([1.7, 64], "1.7 is not a non-negative integer"),
    ([True, 1], "True is not a non-negative integer"),
    (["1x", 1], "'1x' is not a non-negative integer"),  # digits in a string are fine
    ([1] * 33, "more than 32 dimensions"),
    ([-1], "-1 is not a non-negative integer"),
    ([2**63], "more elements than"),
])
@pytest.mark.parametrize("form", ["json", "binary", "bytes-json", "bytes-binary", "grpc-json"])
def test_hostile_shapes_are_400_in_every_request_form(v2: RunningServer, shape, form, fragment):
    """Shapes are checked before anything is reshaped: a shape of non-negative integers,
    at most 32 dimensions, at most as many elements as the body limit has bytes (a zero
    dimension counted as one), whatever form carries the tensor (issue 22, item 5)."""
    datatype = "BYTES" if form.startswith("bytes") else "FP32"
    item = {"name": "t", "shape": shape, "datatype": datatype}
    headers = {}
    if form in ("json", "bytes-json"):
        body = orjson.dumps({"inputs": [{**item, "data": []}]})
    elif form == "grpc-json":
        body = orjson.dumps({"inputs": [{**item, "contents": {"fp32_contents": []}}]})
    else:
        body, headers = _binary({"inputs": [{**item, "parameters": {"binary_data_size": 0}}]}, b"")
    r = infer(v2, "echo", body, headers=headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"], r.json()
    assert "input 't'" in r.json()["error"]


def test_empty_tensors_and_integral_floats_still_work(v2: RunningServer):
    for shape in ([0], [0, 64], [3, 0, 2]):
        r = infer(v2, "echo", {"inputs": [{"name": "t", "shape": shape, "datatype": "FP32",
                                           "data": []}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == shape
    r = infer(v2, "echo", {"inputs": [{"name": "t", "shape": [2.0, 1], "datatype": "FP32",
                                       "data": [1, 2]}]})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 1], r.text


def test_binary_data_size_as_an_integral_float_is_accepted(v2: RunningServer):
    """``binary_data_size: 256.0`` was refused as "runs past the end of the body"
    (issue 22, item 12); a value that is no size says so."""
    raw = np.arange(64, dtype=np.float32).tobytes()
    item = {"name": "t", "shape": [64], "datatype": "FP32"}
    body, headers = _binary({"inputs": [{**item, "parameters": {"binary_data_size": 256.0}}]}, raw)
    r = infer(v2, "echo", body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == list(range(64))
    for size, fragment in ((256.5, "256.5 is not a non-negative integer"),
                           ("2x6", "'2x6' is not a non-negative integer"),
                           (-4, "-4 is not a non-negative integer"),
                           (512, "512 bytes, but only 256 bytes follow")):
        body, headers = _binary({"inputs": [{**item, "parameters": {"binary_data_size": size}}]},
                                raw)
        r = infer(v2, "echo", body, headers=headers)
        assert r.status_code == 400 and fragment in r.json()["error"], (size, r.text)
