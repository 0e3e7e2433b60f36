"""The server's pure parts: the load queue, IPC framing, the V2 codec, model specs
from the command line and config files, the default memory budget (placement,
routing and copies: test_placement.py, test_routing.py)."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import numpy as np
import orjson
import pytest

from cachemesh.config import Settings
from cachemesh.errors import InferenceInputError, InvalidInputError, UnavailableError
from cachemesh.runtimes import InferenceResponse, Tensor
from cachemesh.serve.adapters.v2_codec import Form, encode_response, parse_request
from cachemesh.serve.core.loadqueue import BACKGROUND, REQUEST, LoadQueue
from cachemesh.serve.core.memory import container_limit, default_budget, physical_memory
from cachemesh.serve.core.registry import parse_model_option, read_config
from cachemesh.serve.workers import ipc
from cachemesh.serve.workers.messages import End, Infer

MB = 1024 * 1024


def GB() -> int:
    return 1024 * MB


def test_load_queue_runs_request_loads_first_and_is_bounded():
    async def scenario():
        q = LoadQueue(concurrency=1, max_waiting=3)
        order: list[str] = []
        gate = asyncio.Event()

        async def job(name: str, prio: int, hold: list | None = None):
            async with q.slot(prio, hold):
                order.append(name)
                if name == "first":
                    await gate.wait()

        first = asyncio.create_task(job("first", BACKGROUND))
        await asyncio.sleep(0)
        hold: list = [None]
        bg1 = asyncio.create_task(job("bg1", BACKGROUND))
        bg2 = asyncio.create_task(job("bg2", BACKGROUND, hold))
        req = asyncio.create_task(job("req", REQUEST))
        await asyncio.sleep(0)
        with pytest.raises(UnavailableError, match="waiting already"):
            await job("overflow", REQUEST)
        q.promote(hold[0], REQUEST)  # a request now waits on bg2's load
        gate.set()
        await asyncio.gather(first, bg1, bg2, req)
        return order, q.running

    order, running = asyncio.run(scenario())
    # bg2 was promoted and queued before req: first come, first served among requests
    assert order == ["first", "bg2", "req", "bg1"] and running == 0


def test_ipc_frames_round_trip_with_out_of_band_buffers():
    big = np.arange(100_000, dtype=np.float32)
    small = np.arange(4, dtype=np.int64)
    payload = {"big": big, "small": small, "text": "é"}
    message = Infer("m#1", payload, rid=7)  # type: ignore[arg-type]
    frames = ipc.encode(message)
    assert len(frames) == 3  # header, pickle, one out-of-band buffer
    wire = b"".join(bytes(f) for f in frames) * 2
    decoder = ipc.Decoder()
    got = []
    for i in range(0, len(wire), 1000):  # arrives in pieces
        got.extend(decoder.feed(wire[i:i + 1000]))
    assert len(got) == 2
    kind, rid, key, payload = type(got[1]), got[1].rid, got[1].key, got[1].request
    assert (kind, rid, key) == (Infer, 7, "m#1")
    assert np.array_equal(payload["big"], big) and payload["big"].flags.writeable
    assert np.array_equal(payload["small"], small)
    assert len(ipc.encode(End(3))) == 1


def test_codec_reads_every_form_and_writes_binary_when_asked():
    body = orjson.dumps({"id": 3, "parameters": {"binary_data_output": True}, "inputs": [
        {"name": "a", "shape": [2, 2], "datatype": "FP16", "data": [[1, 2], [3, 4]]}]})
    req, form = parse_request(body)
    assert req.id == "3" and req.inputs[0].data.dtype == np.float16 and form.binary_all
    resp = InferenceResponse([Tensor.of("y", np.array([1.5, 2.5], dtype=np.float32)),
                              Tensor.of("s", np.array([b"ab"], dtype=object))],
                             model_name="m", id="3")
    out, n = encode_response(resp, form)
    head = orjson.loads(out[:n])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert out[n:n + 8] == np.array([1.5, 2.5], dtype="<f4").tobytes()
    assert out[n + 8:] == b"\x02\x00\x00\x00ab"
    out, n = encode_response(resp, Form())
    assert n is None and orjson.loads(out)["outputs"][1]["data"] == ["ab"]
    # FP16 has no gRPC contents field: the answer goes in rawOutputContents, for all outputs
    grpc = encode_response(InferenceResponse([Tensor.of("h", np.array([1], dtype=np.float16)),
                                              Tensor.of("i", np.array([5]))], model_name="m"),
                           Form(grpc_json=True))[0]
    doc = orjson.loads(grpc)
    assert len(doc["rawOutputContents"]) == 2 and "contents" not in doc["outputs"][1]
    with pytest.raises(InferenceInputError, match="outside the body"):
        parse_request(b"{}", header_length=10)
    with pytest.raises(InferenceInputError, match="after the last binary input"):
        parse_request(orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8",
                                                "data": [1]}]}) + b"xx", header_length=len(
            orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1]}]})))


def test_model_option_and_config_file(tmp_path: Path):
    spec = parse_model_option("m=/data/x,runtime=custom,version=2,eager=true,class=mod:Cls")
    assert (spec.name, spec.source, spec.runtime, spec.version, spec.eager) == (
        "m", "/data/x", "custom", "2", True)
    assert spec.parameters == {"class": "mod:Cls"}
    for bad in ("nosource", "m=", "m=/x,oops", "../m=/x"):
        with pytest.raises(InvalidInputError):
            parse_model_option(bad)
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  - name: a\n    source: 's3://b/p?x=1,2'\n    eager: true\n")
    assert read_config(cfg)[0].source == "s3://b/p?x=1,2"
    cfg.write_text("- {name: a, source: /x, colour: red}\n")
    with pytest.raises(InvalidInputError, match="colour"):
        read_config(cfg)


def test_default_budget_follows_the_cgroup_limit(tmp_path: Path):
    (tmp_path / "memory.max").write_text("max\n")
    assert container_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text(str(2 * GB()))
    assert container_limit(tmp_path) == 2 * GB()
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert container_limit(tmp_path) is None  # cgroup v1's "unlimited"
    assert 0.5 * physical_memory() <= default_budget() < physical_memory()


def test_serve_settings_from_the_environment():
    s = Settings.from_env({"CACHEMESH_SERVE_MEMORY": "3GiB", "CACHEMESH_SERVE_WORKERS": "3",
                           "CACHEMESH_SERVE_REQUEST_TIMEOUT": "2.5"}).serve
    assert (s.memory, s.workers, s.request_timeout_s, s.worker_count()) == (3 * GB(), 3, 2.5, 3)
    with pytest.raises(InvalidInputError):
        Settings.from_env({"CACHEMESH_SERVE_PORT": "http"})
    assert pickle.loads(pickle.dumps(s)) == s


def test_batching_merges_alike_requests_and_splits_row_for_row():
    from cachemesh.runtimes import InferenceRequest, RequestedOutput
    from cachemesh.runtimes.batching import merge, split

    def req(rows: int, outputs=("predict",), cols: int = 4):
        data = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) + rows
        return InferenceRequest([Tensor("x", "FP32", data.shape, data)],
                                [RequestedOutput(o) for o in outputs])

    reqs = [req(1), req(3), req(2)]
    merged, sizes = merge(reqs)
    assert sizes == [1, 3, 2] and merged.inputs[0].data.shape == (6, 4)
    answer = InferenceResponse([Tensor.of("predict", merged.inputs[0].data.sum(axis=1))],
                               parameters={"p": 1})
    parts = split(answer, sizes)
    for r, part in zip(reqs, parts, strict=True):
        assert part.outputs[0].data.tolist() == r.inputs[0].data.sum(axis=1).tolist()
        assert part.parameters == {"p": 1}
    assert merge([req(1), req(1, outputs=("predict_proba",))]) is None  # other outputs
    assert merge([req(1), req(1, cols=5)]) is None  # other features
    one_d = InferenceRequest([Tensor("x", "FP32", (4,), np.zeros(4, dtype=np.float32))])
    assert merge([one_d, one_d]) is None  # a 1-D input is one row; stacking would change it
    assert split(InferenceResponse([Tensor.of("y", [1.0])]), sizes) is None  # rows do not line up
