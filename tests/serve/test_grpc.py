"""KServe V2 over gRPC, spoken by tritonclient.grpc (unchanged) to a real server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import queue
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from cachemesh.access import Keyring
from cachemesh.caches import Caches
from cachemesh.cli import main
from cachemesh.config import Settings
from cachemesh.errors import ConflictError, InvalidInputError
from cachemesh.serve import protos
from cachemesh.serve.adapters.v2_grpc import decode_request, start_grpc
from cachemesh.serve.core.registry import MemoryModelRegistry, ModelSpec
from cachemesh.serve.core.service import ModelService
from tests.serve.conftest import RunningServer, free_port, serve_settings, toy_model

MAX_BODY = 2 * 1024**2
INFERENCE_TOKEN = "grpc-inference-token-0123456789"
CONTROL_TOKEN = "grpc-control-token-0123456789ab"
BUCKET_TOKEN = "grpc-bucket-token-0123456789abcd"

ALL_TYPES: dict[str, np.ndarray] = {
    "BOOL": np.array([True, False, True, True]),
    "UINT8": np.array([0, 1, 255, 7], np.uint8),
    "UINT16": np.array([0, 65535, 2, 3], np.uint16),
    "UINT32": np.array([0, 2**32 - 1, 1, 2], np.uint32),
    "UINT64": np.array([0, 2**64 - 1, 1, 2], np.uint64),
    "INT8": np.array([-128, 127, 0, 1], np.int8),
    "INT16": np.array([-32768, 32767, 0, 1], np.int16),
    "INT32": np.array([-2**31, 2**31 - 1, 0, 1], np.int32),
    "INT64": np.array([-2**63, 2**63 - 1, 0, 1], np.int64),
    "FP16": np.array([0.5, -1.25, 2.0, 3.5], np.float16),
    "FP32": np.array([0.1, -1.5, 3.25, 1e30], np.float32),
    "FP64": np.array([0.1, -1e300, 2.5, 1.0], np.float64),
    "BYTES": np.array([b"a", "héllo".encode(), b"", b"\xff\x00 raw"], dtype=np.object_),
}


@dataclasses.dataclass
class GrpcServer:
    server: RunningServer
    address: str

    def client(self) -> tg.InferenceServerClient:
        return tg.InferenceServerClient(url=self.address)


def _start(home: Path, specs: list[ModelSpec], protect: dict[str, str] | None = None,
           **settings: Any) -> Iterator[GrpcServer]:
    port = free_port()
    s = serve_settings(home, grpc_port=port, max_body=MAX_BODY)
    s = dataclasses.replace(s, **settings)
    for bucket, token in (protect or {}).items():
        Caches(s).protect_bucket(bucket, token)
    with RunningServer(s, specs, grpc=True) as server:
        server.wait_ready()
        yield GrpcServer(server, f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def g(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Iterator[GrpcServer]:
    root = tmp_path_factory.mktemp("grpc-models")
    specs = [ModelSpec(name="digits", source=str(digits_dir), eager=True),
             toy_model(root, "echo", eager=True)]
    yield from _start(tmp_path_factory.mktemp("grpc-home"), specs)


@pytest.fixture(scope="module")
def client(g: GrpcServer) -> Iterator[tg.InferenceServerClient]:
    with g.client() as c:
        yield c


@pytest.fixture(scope="module")
def stub(g: GrpcServer) -> Iterator[triton_grpc.GRPCInferenceServiceStub]:
    """tritonclient's own generated stub, for the message forms its high-level client
    never sends (typed contents)."""
    with grpc.insecure_channel(g.address) as channel:
        yield triton_grpc.GRPCInferenceServiceStub(channel)


def status(exc: InferenceServerException) -> str:
    return str(exc.status())


def _fields(desc: Any) -> dict[str, tuple]:
    return {f.name: (f.number, f.type, f.is_repeated,
                     f.message_type.full_name if f.message_type else None,
                     f.containing_oneof.name if f.containing_oneof else None)
            for f in desc.fields}


# Triton's configuration and statistics messages have many fields cachemesh has no
# value for: ours declare a subset, each field as theirs.
PARTIAL = {"ModelConfig", "ModelInput", "ModelOutput", "ModelStatistics", "InferStatistics"}


def _compare(ours: Any, theirs: Any) -> None:
    mine, their_fields = _fields(ours), _fields(theirs)
    if ours.name in PARTIAL:
        assert mine == {k: their_fields[k] for k in mine}, ours.full_name
    else:
        assert mine == their_fields, ours.full_name
    for name, nested in ours.nested_types_by_name.items():
        _compare(nested, theirs.nested_types_by_name[name])


def test_the_protocol_matches_tritonclients_field_by_field():
    """Wire compatibility: every message we declare has the names, numbers and types
    of the one tritonclient compiled, and every RPC the same messages and streaming."""
    theirs = triton_pb2.DESCRIPTOR
    for name, desc in protos.FILE.message_types_by_name.items():
        their = (theirs.message_types_by_name.get(name)
                 or model_config_pb2.DESCRIPTOR.message_types_by_name[name])
        _compare(desc, their)
    their_types = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert ({v.name: v.number for v in protos.FILE.enum_types_by_name["DataType"].values}
            == {v.name: v.number for v in their_types.values})
    their_service = theirs.services_by_name["GRPCInferenceService"]
    assert protos.SERVICE_NAME == their_service.full_name == "inference.GRPCInferenceService"
    for m in protos.SERVICE.methods:
        t = their_service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                m.server_streaming) == (t.input_type.full_name, t.output_type.full_name,
                                        t.client_streaming, t.server_streaming), m.name


def test_health_metadata_and_readiness(client: tg.InferenceServerClient):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "cachemesh" and "model_repository" in meta["extensions"]
    assert client.is_model_ready("digits")
    m = client.get_model_metadata("digits", as_json=True)
    assert m["platform"] == "sklearn"
    assert m["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": ["-1", "64"]}]
    assert m["outputs"][0]["datatype"] == "INT64"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nope")
    assert status(exc.value) == "StatusCode.NOT_FOUND" and "nope" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.is_model_ready("nope")
    assert status(exc.value) == "StatusCode.NOT_FOUND"


def test_model_config_comes_from_the_metadata(client: tg.InferenceServerClient):
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits" and config["platform"] == "sklearn"
    assert config["input"] == [{"name": "input-0", "data_type": "TYPE_FP64",
                                "dims": ["-1", "64"]}]
    assert config["output"][0]["data_type"] == "TYPE_INT64"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_config("nope")
    assert status(exc.value) == "StatusCode.NOT_FOUND"


def test_model_statistics_count_answers_and_failures(client: tg.InferenceServerClient):
    def stats() -> dict[str, Any]:
        (row,) = client.get_inference_statistics("echo", as_json=True)["model_stats"]
        return row

    before = stats()
    ok_before = int(before["inference_stats"].get("success", {}).get("count", 0))
    fail_before = int(before["inference_stats"].get("fail", {}).get("count", 0))
    x = tg.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    client.infer("echo", [x])
    with pytest.raises(InferenceServerException):
        client.infer("echo", [x], parameters={"fail": "input"})
    with pytest.raises(InferenceServerException):  # refused before it reached the model
        client.infer("echo", [x], model_version="no-such-version")
    after = stats()
    assert int(after["inference_stats"]["success"]["count"]) == ok_before + 1
    assert int(after["inference_stats"]["success"]["ns"]) > 0
    assert int(after["inference_stats"]["fail"]["count"]) == fail_before + 1
    assert int(after["inference_count"]) == ok_before + 1
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {"digits", "echo"} <= {row["name"] for row in every}


def test_grpc_health_service_for_kubernetes_probes(g: GrpcServer):
    """What a Kubernetes gRPC probe calls: grpc.health.v1.Health/Check, no token."""
    check = protos.methods(protos.HEALTH)["Check"]
    with grpc.insecure_channel(g.address) as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check",
                                   request_serializer=check[0].SerializeToString,
                                   response_deserializer=check[1].FromString)
        for name in ("", "inference.GRPCInferenceService"):
            assert call(check[0](service=name), timeout=10).status == protos.SERVING
        with pytest.raises(grpc.RpcError) as exc:
            call(check[0](service="nope"), timeout=10)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=check[0].SerializeToString,
                                     response_deserializer=check[1].FromString)
        stream = watch(check[0](service=""), timeout=10)
        assert next(stream).status == protos.SERVING
        stream.cancel()


def test_digits_predictions_with_fp32_raw_inputs(client: tg.InferenceServerClient, digits_data):
    x, y = digits_data
    inp = tg.InferInput("predict", [8, 64], "FP32")
    inp.set_data_from_numpy(x[:8])
    result = client.infer("digits", [inp], request_id="r-1")
    assert result.as_numpy("predict").tolist() == y[:8].tolist()
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == "digits"
    assert len(response.raw_output_contents) == 1  # raw in, raw out (as Triton answers)
    # an output asked for by name
    out = tg.InferRequestedOutput("decision_function")
    result = client.infer("digits", [inp], outputs=[out])
    assert result.as_numpy("decision_function").shape == (8, 10)


def test_every_datatype_round_trips_raw(client: tg.InferenceServerClient):
    inputs = []
    for dt, values in ALL_TYPES.items():
        inp = tg.InferInput(dt.lower(), [2, 2], dt)
        inp.set_data_from_numpy(values.reshape(2, 2))
        inputs.append(inp)
    result = client.infer("echo", inputs, parameters={"tag": "x", "n": 3})
    for dt, values in ALL_TYPES.items():
        got = result.as_numpy(dt.lower())
        assert got.shape == (2, 2), dt
        assert got.reshape(-1).tolist() == values.tolist(), dt
        assert result.get_output(dt.lower()).datatype == dt
    assert result.get_response().parameters["echoed"].int64_param == len(ALL_TYPES)


def test_typed_contents_in_typed_contents_out(stub: triton_grpc.GRPCInferenceServiceStub):
    req = triton_pb2.ModelInferRequest(model_name="echo", id="typed")
    for name, dt, shape, field, values in [
            ("f", "FP32", [2], "fp32_contents", [1.5, -2.0]),
            ("i", "INT64", [1, 2], "int64_contents", [-(2**63), 7]),
            ("s", "BYTES", [2], "bytes_contents", [b"x", b"\xff"]),
            ("b", "INT8", [2], "int_contents", [-128, 127]),
            ("e", "FP64", [0], "fp64_contents", [])]:
        t = req.inputs.add(name=name, datatype=dt, shape=shape)
        getattr(t.contents, field).extend(values)
    res = stub.ModelInfer(req)
    assert res.id == "typed" and not res.raw_output_contents
    out = {o.name: o for o in res.outputs}
    assert list(out["f"].contents.fp32_contents) == [1.5, -2.0]
    assert list(out["i"].contents.int64_contents) == [-(2**63), 7]
    assert list(out["i"].shape) == [1, 2]
    assert list(out["s"].contents.bytes_contents) == [b"x", b"\xff"]
    assert list(out["b"].contents.int_contents) == [-128, 127]
    assert list(out["e"].shape) == [0]
    # FP16 has no typed field: every output of that answer goes raw, by position
    req = triton_pb2.ModelInferRequest(model_name="echo")
    req.inputs.add(name="f", datatype="FP32", shape=[1]).contents.fp32_contents.append(2.5)
    req.inputs.add(name="h", datatype="FP16", shape=[0])
    res = stub.ModelInfer(req)
    assert [np.frombuffer(r, np.float32 if i == 0 else np.float16).tolist()
            for i, r in enumerate(res.raw_output_contents)] == [[2.5], []]


@pytest.mark.parametrize("build, words", [
    (lambda r: r.inputs.add(name="b", datatype="INT8", shape=[1]).contents.int_contents.append(
        300), "out of range for INT8"),
    (lambda r: r.inputs.add(name="f", datatype="FP32", shape=[3]).contents.fp32_contents.extend(
        [1, 2]), "needs 3 values"),
    (lambda r: r.inputs.add(name="f", datatype="FP32", shape=[2]).contents.int64_contents.extend(
        [1, 2]), "contents.fp32_contents"),
    (lambda r: r.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(
        1), "raw_input_contents"),
    (lambda r: r.inputs.add(name="x", datatype="FP8", shape=[1]), "unknown datatype"),
    (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[-1]), "negative"),
    (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1]), "has no data"),
    (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1]),
                r.inputs.add(name="y", datatype="FP32", shape=[1]),
                r.raw_input_contents.append(b"\0\0\0\0")), "one per input"),
    (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1]),
                r.raw_input_contents.append(b"\0\0\0")), "whole number"),
    (lambda r: (r.inputs.add(name="s", datatype="BYTES", shape=[1]),
                r.raw_input_contents.append(b"\x09\0\0\0ab")), "truncated"),
    (lambda r: None, "at least one input"),
    # Shapes checked before reshaping (issue 22, item 5): these were INTERNAL.
    (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[2**62, 2**62, 0]),
     "more elements than the limit of 2097152"),
    (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[2**62, 2**62, 0]),
                r.raw_input_contents.append(b"")), "more elements than"),
    (lambda r: r.inputs.add(name="s", datatype="BYTES", shape=[0, 2**40]).contents.SetInParent(),
     "more elements than"),
    (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1] * 33), "more than 32 dimensions"),
])
def test_bad_requests_are_invalid_argument(stub, build, words):
    req = triton_pb2.ModelInferRequest(model_name="echo")
    build(req)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(req)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in exc.value.details()


def test_errors_map_to_status_codes(client: tg.InferenceServerClient, g: GrpcServer, stub):
    inp = tg.InferInput("x", [2, 2], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 2), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [inp])
    assert status(exc.value) == "StatusCode.NOT_FOUND" and "nope" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.infer("digits", [inp])  # 4 features, the SVM wants 64
    assert status(exc.value) == "StatusCode.INVALID_ARGUMENT"
    bad = tg.InferInput("x", [4], "FP32")
    bad.set_data_from_numpy(np.zeros(4, np.float32))
    bad.set_shape([3])  # 3 values announced, 4 sent (the client checks only before)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("echo", [bad])
    assert status(exc.value) == "StatusCode.INVALID_ARGUMENT" and "needs 3 values" in str(exc.value)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("echo", [inp], parameters={"fail": "model"})
    assert status(exc.value) == "StatusCode.INTERNAL" and "ZeroDivisionError" in str(exc.value)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("echo", [inp], parameters={"fail": "input"})
    assert status(exc.value) == "StatusCode.INVALID_ARGUMENT"
    # a message over --max-body is refused before it is read
    big = tg.InferInput("x", [MAX_BODY // 4 + 1024], "FP32")
    big.set_data_from_numpy(np.zeros(MAX_BODY // 4 + 1024, np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("echo", [big])
    assert status(exc.value) == "StatusCode.RESOURCE_EXHAUSTED"
    # while draining: UNAVAILABLE, and not ready; live still
    g.server.service.begin_drain()
    try:
        with pytest.raises(InferenceServerException) as exc:
            client.infer("echo", [inp])
        assert status(exc.value) == "StatusCode.UNAVAILABLE"
        assert not client.is_server_ready() and client.is_server_live()
        req = triton_pb2.ModelInferRequest(model_name="echo")
        req.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.ModelInfer(req)
        assert ("retry-after", "1") in rpc.value.trailing_metadata()
    finally:
        g.server.service.draining = False
    assert client.infer("echo", [inp]).as_numpy("x").shape == (2, 2)


def test_the_asyncio_client_too(g: GrpcServer):
    import tritonclient.grpc.aio as tga

    async def main() -> list:
        async with tga.InferenceServerClient(g.address) as c:
            inp = tga.InferInput("s", [2], "BYTES")
            inp.set_data_from_numpy(np.array([b"x", b"yz"], dtype=np.object_))
            results = await asyncio.gather(*(c.infer("echo", [inp]) for _ in range(4)))
            return [r.as_numpy("s").tolist() for r in results]

    assert asyncio.run(main()) == [[b"x", b"yz"]] * 4


def test_routes_read_the_calls_metadata(g: GrpcServer, client: tg.InferenceServerClient,
                                        stub, tmp_path_factory: pytest.TempPathFactory):
    """A model with two versions (docs/mesh.md): its routes read gRPC metadata as
    REST's headers; the version that answered comes back in the body and metadata."""
    root = tmp_path_factory.mktemp("grpc-ab")
    v1, v2 = toy_model(root, "ab1"), toy_model(root, "ab2")
    doc = {"versions": {label: {"source": s.source, "runtime": "custom", "parameters": s.parameters}
                        for label, s in (("v1", v1), ("v2", v2))},
           "traffic": {"v1": 100, "v2": 0},
           "routes": [{"header": "x-model-version", "value": "v2", "version": "v2"}]}
    r = g.server.client.put("/api/v1/models/ab", json=doc)
    assert r.status_code == 201, r.text
    inp = tg.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.ones(1, np.float32))
    assert client.infer("ab", [inp]).get_response().model_version == "v1"
    routed = client.infer("ab", [inp], headers={"x-model-version": "v2"})
    assert routed.get_response().model_version == "v2"
    named = client.infer("ab", [inp], model_version="v1", headers={"x-model-version": "v2"})
    assert named.get_response().model_version == "v1"  # what the request names wins
    req = triton_pb2.ModelInferRequest(model_name="ab")
    req.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    _, call = stub.ModelInfer.with_call(req, metadata=(("x-model-version", "v2"),))
    assert ("x-model-version", "v2") in call.initial_metadata()
    index = [(m.name, m.version) for m in client.get_model_repository_index().models]
    assert ("ab", "v1") in index and ("ab", "v2") in index
    # one version, declared without a label: no version in the answer
    assert client.infer("echo", [inp]).get_response().model_version == ""
    assert g.server.client.delete("/api/v1/models/ab").status_code in (200, 204)


def test_stream_infer_answers_each_request(client: tg.InferenceServerClient):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        inp = tg.InferInput("x", [2], "INT64")
        inp.set_data_from_numpy(np.array([5, 6], np.int64))
        client.async_stream_infer("echo", [inp], request_id="a")
        client.async_stream_infer("nope", [inp], request_id="b")
        client.async_stream_infer("echo", [inp], request_id="c")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert got[0][0].as_numpy("x").tolist() == [5, 6] and got[0][0].get_response().id == "a"
    assert got[1][0] is None and "nope" in str(got[1][1])
    assert got[2][0].get_response().id == "c"


def test_repository_index_unload_and_load(client: tg.InferenceServerClient):
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"digits": "READY", "echo": "READY"}
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    assert [m.name for m in client.get_model_repository_index().models] == ["digits", "echo"]
    client.load_model("echo")
    assert client.is_model_ready("echo")
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("nope")
    assert status(exc.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("other", config="{}", files={"file:1/model.bin": b"weights"})
    assert status(exc.value) == "StatusCode.INVALID_ARGUMENT"
    assert "not supported" in exc.value.message()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    root = tmp_path_factory.mktemp("grpc-secured-models")
    secret = toy_model(root, "secret").model_copy(update={"bucket": "team-a"})
    yield from _start(tmp_path_factory.mktemp("grpc-secured-home"),
                      [toy_model(root, "echo", eager=True), secret],
                      protect={"team-a": BUCKET_TOKEN},
                      inference_token=INFERENCE_TOKEN, api_token=CONTROL_TOKEN)


def test_tokens_are_required_when_configured(secured: GrpcServer):
    inp = tg.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.ones(1, np.float32))
    bearer = {"authorization": f"Bearer {INFERENCE_TOKEN}"}
    with secured.client() as c:
        assert c.is_server_live() and c.is_server_ready()  # probes stay open
        for headers in (None, {"authorization": "Bearer not-a-token-of-this-server"},
                        {"authorization": f"Basic {INFERENCE_TOKEN}"}):
            with pytest.raises(InferenceServerException) as exc:
                c.infer("echo", [inp], headers=headers)
            assert status(exc.value) == "StatusCode.UNAUTHENTICATED", headers
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_metadata("echo")
        assert status(exc.value) == "StatusCode.UNAUTHENTICATED"
        assert c.infer("echo", [inp], headers=bearer).as_numpy("x").tolist() == [1.0]
        # the repository extension is control: the inference token is not enough
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_repository_index(headers=bearer)
        assert status(exc.value) == "StatusCode.PERMISSION_DENIED"
        control = {"authorization": f"Bearer {CONTROL_TOKEN}"}
        assert [m.name for m in c.get_model_repository_index(headers=control).models] == ["echo"]
        assert c.infer("echo", [inp], headers=control).as_numpy("x").tolist() == [1.0]


def test_a_protected_bucket_needs_its_token(secured: GrpcServer):
    inp = tg.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.ones(1, np.float32))
    bearer = {"authorization": f"Bearer {INFERENCE_TOKEN}"}
    with secured.client() as c:
        with pytest.raises(InferenceServerException) as exc:  # as if it did not exist
            c.infer("secret", [inp], headers=bearer)
        assert status(exc.value) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_metadata("secret", headers=bearer)
        assert status(exc.value) == "StatusCode.NOT_FOUND"
        both = {**bearer, "x-cachemesh-bucket-token": BUCKET_TOKEN}
        assert c.infer("secret", [inp], headers=both).as_numpy("x").tolist() == [1.0]
        assert c.get_model_metadata("secret", headers=both).name == "secret"


def test_a_taken_grpc_port_is_an_error_not_a_shared_port(tmp_path: Path):
    with socket.socket() as taken:
        # as another gRPC server holds it: grpcio would share such a port by default
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = serve_settings(tmp_path, grpc_port=taken.getsockname()[1])
        service = ModelService(settings, registry=MemoryModelRegistry())
        with pytest.raises(ConflictError, match="taken"):
            asyncio.run(start_grpc(service, Keyring()))


def test_a_max_body_past_2_gib_still_serves(tmp_path: Path):
    """gRPC's message limit is a C int: --max-body 8GiB was an OverflowError at start."""
    settings = serve_settings(tmp_path, grpc_port=free_port(), max_body=8 * 1024**3)
    service = ModelService(settings, registry=MemoryModelRegistry())

    async def start_and_stop() -> None:
        server = await start_grpc(service, Keyring())
        await server.stop(0)

    asyncio.run(start_and_stop())


def test_the_grpc_port_setting():
    assert Settings.from_env({}).serve.grpc_port == 8033
    assert Settings.from_env({"CACHEMESH_SERVE_GRPC_PORT": "0"}).serve.grpc_port == 0  # off
    for bad in ("70000", "-1", "grpc"):
        with pytest.raises(InvalidInputError, match="CACHEMESH_SERVE_GRPC_PORT"):
            Settings.from_env({"CACHEMESH_SERVE_GRPC_PORT": bad})
    r = CliRunner().invoke(main, ["serve", "--grpc-port", "70000"])
    assert r.exit_code == 2 and "--grpc-port" in r.output


CONTENT_FIELDS = [f.name for f in protos.message("InferTensorContents").DESCRIPTOR.fields]


def _raw_of(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    """Mostly well-formed raw contents for the tensor, now and then arbitrary bytes."""
    n = math.prod(shape) if all(d >= 0 for d in shape) else 0
    if draw(st.integers(0, 3)) == 0 or datatype.upper() not in ALL_TYPES:
        return draw(st.binary(max_size=24))
    if datatype.upper() == "BYTES":
        items = draw(st.lists(st.binary(max_size=4), min_size=n, max_size=n))
        return b"".join(len(b).to_bytes(4, "little") + b for b in items)
    return draw(st.binary(min_size=n * ALL_TYPES[datatype.upper()].itemsize,
                          max_size=n * ALL_TYPES[datatype.upper()].itemsize))


@st.composite
def infer_requests(draw: st.DrawFn) -> Any:
    """Arbitrary ModelInferRequests: any datatype name, shape, contents field and raw bytes."""
    req = protos.ModelInferRequest(model_name="echo", id=draw(st.text(max_size=8)))
    raw = draw(st.booleans())
    for i in range(draw(st.integers(0, 3))):
        datatype = draw(st.sampled_from([*ALL_TYPES, "fp32", "FP8", ""]))
        shape = draw(st.lists(st.integers(-1, 3), max_size=3))
        t = req.inputs.add(name=draw(st.sampled_from(["", f"in{i}", f"in{i}"])),
                           datatype=datatype, shape=shape)
        if draw(st.booleans()):
            t.parameters["p"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        if raw:
            if draw(st.integers(0, 4)):  # now and then one short
                req.raw_input_contents.append(_raw_of(draw, datatype, shape))
        elif draw(st.booleans()):
            field = draw(st.sampled_from(CONTENT_FIELDS))
            values = {"bool_contents": st.booleans(), "bytes_contents": st.binary(max_size=4),
                      "fp32_contents": st.floats(width=32), "fp64_contents": st.floats(),
                      "int_contents": st.integers(-(2**31), 2**31 - 1),
                      "uint_contents": st.integers(0, 2**32 - 1),
                      "int64_contents": st.integers(-(2**63), 2**63 - 1),
                      "uint64_contents": st.integers(0, 2**64 - 1)}[field]
            getattr(t.contents, field).extend(draw(st.lists(values, max_size=6)))
    if raw and draw(st.booleans()):
        req.raw_input_contents.append(b"extra")
    return req


@settings(max_examples=300, deadline=None)
@given(infer_requests())
def test_any_request_decodes_or_is_invalid_input(req: Any):
    """Whatever a client sends, the answer is a request for the model or INVALID_ARGUMENT,
    never an internal error; what decodes keeps every input's shape and datatype."""
    try:
        decoded, raw = decode_request(req)
    except InvalidInputError:
        return
    assert raw == bool(req.raw_input_contents)
    assert not raw or len(req.raw_input_contents) == len(req.inputs)
    for tensor, sent in zip(decoded.inputs, req.inputs, strict=True):
        assert tensor.shape == tuple(sent.shape) and tensor.data.shape == tensor.shape
        assert tensor.datatype == sent.datatype.upper()
