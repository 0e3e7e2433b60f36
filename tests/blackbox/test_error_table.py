"""Errors -> HTTP status, gRPC code, exit code: the rows of error_table.py, provoked from outside.

Each row is caused once per surface it names: a request to the shared server
over HTTP (REST or the control API), a call over gRPC, or a ``cachemesh``
command (on a store of this module's own, or against the shared server). The
rows that need a server with tight limits are in test_error_limits.py.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from cachemesh import errors as e
from tests.blackbox.conftest import (
    CONTROL_TOKEN,
    INFERENCE_TOKEN,
    Server,
    cm,
    environ,
    free_port,
    toy_model,
    toy_spec,
    wait_until,
)
from tests.blackbox.error_table import NOT_PROVOKED, TABLE
from tests.emulators.http_origin import HttpOrigin

# What each answer says (a part of it that names what went wrong).
SAYS = {
    "malformed-request": "unsupported Content-Encoding 'br'",
    "unsafe-path": "outside the directories this server deploys from",
    "unknown-scheme": "unknown source scheme 'gopher://'",
    "input-refused": "the toy takes no request with fail=input",
    "unknown-runtime": "unknown runtime 'nope'",
    "body-too-large": "over the limit of 1048576 bytes",
    "json-too-deep": "nests deeper than 32 levels",
    "no-token": "needs a bearer token",
    "unknown-token": "the bearer token is not valid",
    "token-of-other-scope": "does not allow control requests",
    "protected-bucket": "bucket 'secure' is protected",
    "unknown-model": "no model named 'no-such-model'",
    "unknown-cache": "no cache named 'no-such-cache'",
    "origin-has-no-such-file": "not found at the origin (HTTP 404)",
    "name-taken": "model 'err-toy' exists with another spec",
    "unload-with-requests-in-flight": "has 1 request(s) in flight",
    "cache-in-use": "cache 'echo' is in use",
    "checksum-mismatch": "the fetched bytes have sha256",
    "origin-refuses": "refused access (HTTP 403)",
    "origin-fails": "answered HTTP 500",
    "load-raises": "RuntimeError: the toy refuses to load",
    "model-marked-failed": "model 'err-fail-load' is marked failed",
    "predict-raises": "ZeroDivisionError: the toy divided by zero",
    "worker-dies": "exited with status 7",
}
GRPC_SAYS = {"malformed-request": "model files in the request are not supported",
             "body-too-large": "larger than max"}
CLI_SAYS = {
    "malformed-request": "not YAML or JSON",
    "unsafe-path": "'..' is not allowed",
    "unknown-scheme": "unknown source scheme",
    "body-too-large": "(HTTP 413)",
    "no-token": "(set CACHEMESH_API_TOKEN) (HTTP 401)",
    "unknown-token": "not valid (set CACHEMESH_API_TOKEN) (HTTP 401)",
    "token-of-other-scope": "(HTTP 403)",
    "protected-bucket": "is protected; the request does not carry its token (HTTP 403)",
    "unknown-model": "no model named 'no-such-model' (HTTP 404)",
    "unknown-cache": "no cache named 'no-such-cache'",
    "unknown-job": "no job with id 'no-such-job'",
    "origin-has-no-such-file": "not found at the origin",
    "name-taken": "(HTTP 409)",
    "cache-in-use": "cache 'echo' is in use",
    "cache-size-limit": "over its size limit",
    "checksum-mismatch": "sha256",  # issue 22 rewords what it says of a --sha256 given
    "origin-refuses": "refused access",
    "origin-fails": "answered HTTP 500",
    "store-unusable": "cannot create the store",
    "store-from-the-future": "newer than this cachemesh understands",
    "converter-fails": "failed to convert",
    "load-raises": "rollout of model 'err-roll' failed, traffic stays as it was",
    "server-unreachable": "cannot reach the server",
}

REST: dict[str, Callable[[Any], httpx.Response]] = {}
GRPC: dict[str, Callable[[Any], tuple[str, str]]] = {}
CLI: dict[str, Callable[[Any], subprocess.CompletedProcess]] = {}


def provokes(registry: dict[str, Callable], scenario: str) -> Callable:
    def register(fn: Callable) -> Callable:
        registry[scenario] = fn
        return fn
    return register


class Ctx:
    """What the provocations share: the server, the origins, and models deployed for them."""

    def __init__(self, server: Server, origins: Path, home: Path, origin: HttpOrigin) -> None:
        self.server, self.origins, self.origin = server, origins, origin
        self.local = environ(home)  # a store of this module's own
        self.remote = {**server.env, "CACHEMESH_URL": server.url}  # `cachemesh models` to it

    def infer(self, model: str, **parameters: Any) -> httpx.Response:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                            "data": [1, 2, 3, 4]}], "parameters": parameters}
        return self.server.http.post(f"/v2/models/{model}/infer", json=body,
                                     headers=self.server.infer)

    def load(self, model: str) -> httpx.Response:
        return self.server.http.post(f"/v2/repository/models/{model}/load",
                                     headers=self.server.control)

    def grpc(self, call: Callable[[], Any]) -> tuple[str, str]:
        """The name of the status code the call ended with, and its message."""
        from tritonclient.utils import InferenceServerException

        try:
            call()
        except InferenceServerException as exc:
            return exc.status().removeprefix("StatusCode."), exc.message()
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
        raise AssertionError("the call succeeded")

    def grpc_infer(self, model: str, metadata: dict[str, str] | None = None,
                   array: np.ndarray | None = None, **parameters: Any) -> tuple[str, str]:
        import tritonclient.grpc as tg

        array = np.ones((1, 4), np.float32) if array is None else array
        x = tg.InferInput("x", list(array.shape), "FP32")
        x.set_data_from_numpy(array)
        headers = self.server.infer if metadata is None else metadata
        return self.grpc(lambda: self.server.grpc().infer(model, [x], headers=headers,
                                                          parameters=parameters or None))

    def grpc_repo(self, method: str, model: str, token: str = CONTROL_TOKEN,
                  **params: str | bytes) -> tuple[str, str]:
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        with grpc.insecure_channel(self.server.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            if method == "index":
                return self.grpc(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(),
                                                              metadata=metadata))
            parameters = {k: pb.ModelRepositoryParameter(
                **{"bytes_param" if isinstance(v, bytes) else "string_param": v})
                for k, v in params.items()}
            request_cls = (pb.RepositoryModelLoadRequest if method == "load"
                           else pb.RepositoryModelUnloadRequest)
            rpc = stub.RepositoryModelLoad if method == "load" else stub.RepositoryModelUnload
            return self.grpc(lambda: rpc(request_cls(model_name=model, parameters=parameters),
                                         metadata=metadata, timeout=60))

    def in_flight(self, model: str, call: Callable[[], Any]) -> Any:
        """``call()`` while one slow request to ``model`` is in flight."""
        slow = threading.Thread(target=self.infer, args=(model,), kwargs={"delay": 1.0})
        slow.start()
        try:
            wait_until(lambda: self.server.model(model)["inflight"] == 1, 10, "the request")
            return call()
        finally:
            slow.join()


@pytest.fixture(scope="module")
def ctx(server: Server, origins: Path, hf_hub: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    with HttpOrigin() as origin:
        origin.files["/w.bin"] = b"w" * 4096
        for path, status in (("/refused.bin", 403), ("/failing.bin", 500)):
            origin.files[path] = b"x"
            origin.errors[path] = [status] * 1000
        weights = b"corrupt me" * 100
        hf_hub.commit("org/err-corrupt", {"config.json": b"{}", "weights.bin": weights})
        hf_hub.corrupt(hashlib.sha256(weights).hexdigest())
        c = Ctx(server, origins, tmp_path_factory.mktemp("errors") / "home", origin)
        server.deploy(toy_spec(origins, "err-toy"))
        server.deploy(toy_spec(origins, "err-crash"))
        server.deploy(toy_spec(origins, "err-fail-load", load_fail="raise"))
        server.deploy({**toy_spec(origins, "err-rt"), "runtime": "nope"})
        for name, source in (("err-missing", origin.url("/missing.bin")),
                             ("err-refused", origin.url("/refused.bin")),
                             ("err-failing", origin.url("/failing.bin")),
                             ("err-corrupt", "hf://org/err-corrupt")):
            server.deploy({"name": name, "source": source})
        yield c


# -- HTTP ---------------------------------------------------------------------------------

@provokes(REST, "malformed-request")
def _(c: Ctx) -> httpx.Response:
    return c.server.http.post("/v2/models/err-toy/infer", content=b"{}", headers={
        **c.server.infer, "content-encoding": "br"})


@provokes(REST, "unsafe-path")
def _(c: Ctx) -> httpx.Response:
    return c.server.http.post("/api/v1/models", headers=c.server.control,
                              json={"name": "err-etc", "source": "/etc"})


@provokes(REST, "unknown-scheme")
def _(c: Ctx) -> httpx.Response:
    return c.server.http.post("/api/v1/models", headers=c.server.control,
                              json={"name": "err-gopher", "source": "gopher://host/model"})


REST["input-refused"] = lambda c: c.infer("err-toy", fail="input")
REST["unknown-runtime"] = lambda c: c.load("err-rt")


@provokes(REST, "body-too-large")
def _(c: Ctx) -> httpx.Response:  # --max-body 1MiB
    return c.server.http.post("/v2/models/err-toy/infer", content=b" " * (3 * 2**19),
                              headers=c.server.infer)


@provokes(REST, "json-too-deep")
def _(c: Ctx) -> httpx.Response:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    return c.infer("err-toy", deep=deep)


REST["no-token"] = lambda c: c.server.http.get("/api/v1/models")
REST["unknown-token"] = lambda c: c.server.http.get(
    "/api/v1/models", headers={"authorization": "Bearer not-a-token-anyone-issued"})
REST["token-of-other-scope"] = lambda c: c.server.http.get("/api/v1/models",
                                                           headers=c.server.infer)


@provokes(REST, "protected-bucket")
def _(c: Ctx) -> httpx.Response:
    return c.server.http.post("/api/v1/models", headers=c.server.control,
                              json={**toy_spec(c.origins, "err-secure"), "bucket": "secure"})


REST["unknown-model"] = lambda c: c.infer("no-such-model")
REST["unknown-cache"] = lambda c: c.server.http.get("/api/v1/datacaches/no-such-cache",
                                                    headers=c.server.control)
REST["origin-has-no-such-file"] = lambda c: c.load("err-missing")


@provokes(REST, "name-taken")
def _(c: Ctx) -> httpx.Response:
    return c.server.http.post("/api/v1/models", headers=c.server.control,
                              json=toy_spec(c.origins, "err-toy", size=1))


REST["unload-with-requests-in-flight"] = lambda c: c.in_flight("err-toy", lambda: (
    c.server.http.post("/v2/repository/models/err-toy/unload", headers=c.server.control)))


@provokes(REST, "cache-in-use")
def _(c: Ctx) -> httpx.Response:
    assert c.infer("echo").status_code == 200  # loaded, so its cache is in use
    return c.server.http.delete("/api/v1/datacaches/echo", headers=c.server.control)


REST["checksum-mismatch"] = lambda c: c.load("err-corrupt")
REST["origin-refuses"] = lambda c: c.load("err-refused")
REST["origin-fails"] = lambda c: c.load("err-failing")
REST["load-raises"] = lambda c: c.load("err-fail-load")


@provokes(REST, "model-marked-failed")
def _(c: Ctx) -> httpx.Response:
    assert c.load("err-fail-load").status_code == 500
    return c.infer("err-fail-load")


REST["predict-raises"] = lambda c: c.infer("err-toy", fail="model")
REST["worker-dies"] = lambda c: c.infer("err-crash", fail="crash")


@pytest.mark.parametrize("scenario", sorted(REST))
def test_http_status(ctx: Ctx, scenario: str):
    r = REST[scenario](ctx)
    assert r.status_code == TABLE[scenario].http, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and SAYS[scenario] in error
    assert "Traceback" not in error
    if r.status_code == 401:
        assert r.headers["www-authenticate"].startswith('Bearer realm="cachemesh"')
    if r.status_code in (429, 503):
        assert int(r.headers["retry-after"]) >= 1


def test_http_challenges_say_what_was_wrong(ctx: Ctx):
    assert REST["no-token"](ctx).headers["www-authenticate"] == 'Bearer realm="cachemesh"'
    assert REST["unknown-token"](ctx).headers["www-authenticate"] == (
        'Bearer realm="cachemesh", error="invalid_token"')
    assert REST["token-of-other-scope"](ctx).headers["www-authenticate"] == (
        'Bearer realm="cachemesh", error="insufficient_scope", scope="control"')


def test_openai_errors_take_the_same_statuses_in_openai_bodies(ctx: Ctx):
    def complete(model: str, prompt: str) -> tuple[int, str]:
        r = ctx.server.http.post("/v1/completions", headers=ctx.server.infer,
                                 json={"model": model, "prompt": prompt})
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return r.status_code, error["type"]

    assert complete("no-such-model", "hi") == (404, "not_found_error")
    assert complete("err-toy", "refuse this") == (400, "invalid_request_error")
    assert complete("err-toy", "explode now") == (500, "server_error")


# -- gRPC ---------------------------------------------------------------------------------

GRPC["malformed-request"] = lambda c: c.grpc_repo("load", "err-toy", **{"file:1/m": b"x"})
GRPC["unsafe-path"] = lambda c: c.grpc_repo("load", "err-etc-g", source="/etc")
GRPC["unknown-scheme"] = lambda c: c.grpc_repo("load", "err-gopher-g", source="gopher://h/m")
GRPC["input-refused"] = lambda c: c.grpc_infer("err-toy", fail="input")
GRPC["unknown-runtime"] = lambda c: c.grpc_repo("load", "err-rt")
GRPC["body-too-large"] = lambda c: c.grpc_infer(
    "err-toy", array=np.zeros((2**17, 4), np.float32))  # 2 MiB
GRPC["no-token"] = lambda c: c.grpc_infer("err-toy", metadata={})
GRPC["unknown-token"] = lambda c: c.grpc_infer(
    "err-toy", metadata={"authorization": "Bearer not-a-token-anyone-issued"})
GRPC["token-of-other-scope"] = lambda c: c.grpc_repo("index", "", token=INFERENCE_TOKEN)
GRPC["unknown-model"] = lambda c: c.grpc_infer("no-such-model")
GRPC["origin-has-no-such-file"] = lambda c: c.grpc_repo("load", "err-missing")
GRPC["unload-with-requests-in-flight"] = lambda c: c.in_flight(
    "err-toy", lambda: c.grpc_repo("unload", "err-toy"))
GRPC["checksum-mismatch"] = lambda c: c.grpc_repo("load", "err-corrupt")
GRPC["origin-refuses"] = lambda c: c.grpc_repo("load", "err-refused")
GRPC["origin-fails"] = lambda c: c.grpc_repo("load", "err-failing")
GRPC["load-raises"] = lambda c: c.grpc_repo("load", "err-fail-load")


@provokes(GRPC, "model-marked-failed")
def _(c: Ctx) -> tuple[str, str]:
    assert c.load("err-fail-load").status_code == 500
    return c.grpc_infer("err-fail-load")


GRPC["predict-raises"] = lambda c: c.grpc_infer("err-toy", fail="model")
GRPC["worker-dies"] = lambda c: c.grpc_infer("err-crash", fail="crash")


@pytest.mark.parametrize("scenario", sorted(GRPC))
def test_grpc_code(ctx: Ctx, scenario: str):
    code, message = GRPC[scenario](ctx)
    assert code == TABLE[scenario].grpc, message
    assert GRPC_SAYS.get(scenario, SAYS[scenario]) in message


# -- the command line ---------------------------------------------------------------------

def _apply(c: Ctx, doc: dict[str, Any], name: str) -> subprocess.CompletedProcess:
    path = c.origins.parent / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return cm(c.remote, "models", "apply", str(path), check=False)




@provokes(CLI, "malformed-request")
def _(c: Ctx) -> subprocess.CompletedProcess:
    path = c.origins.parent / "not-yaml.yaml"
    path.write_text("{unclosed")
    return cm(c.remote, "models", "apply", str(path), check=False)


CLI["unsafe-path"] = lambda c: cm(c.local, "pull", str(c.origins / "digits-svm"), "--path",
                                  "../../etc", check=False)
CLI["unknown-scheme"] = lambda c: cm(c.local, "pull", "gopher://host/model", check=False)
CLI["body-too-large"] = lambda c: _apply(c, {**toy_spec(c.origins, "err-huge"),
                                             "parameters": {"pad": "x" * 2**21}}, "huge")
CLI["no-token"] = lambda c: cm({k: v for k, v in c.remote.items()
                                if k != "CACHEMESH_API_TOKEN"}, "models", "ls", check=False)
CLI["unknown-token"] = lambda c: cm({**c.remote, "CACHEMESH_API_TOKEN": "not-issued-token-12"},
                                    "models", "ls", check=False)
CLI["token-of-other-scope"] = lambda c: cm({**c.remote, "CACHEMESH_API_TOKEN": INFERENCE_TOKEN},
                                           "models", "ls", check=False)
CLI["protected-bucket"] = lambda c: cm(c.remote, "models", "deploy", "err-secure-cli", str(
    toy_model(c.origins, "err-secure-cli")), "--bucket", "secure", check=False)
CLI["unknown-model"] = lambda c: cm(c.remote, "models", "rm", "no-such-model", check=False)
CLI["unknown-cache"] = lambda c: cm(c.local, "cache", "status", "no-such-cache", check=False)
CLI["unknown-job"] = lambda c: cm(c.local, "jobs", "logs", "no-such-job", check=False)
CLI["origin-has-no-such-file"] = lambda c: cm(c.local, "pull", c.origin.url("/missing.bin"),
                                              check=False)
CLI["name-taken"] = lambda c: cm(c.remote, "models", "deploy", "err-toy", str(
    c.origins / "digits-svm"), check=False)


@provokes(CLI, "cache-in-use")
def _(c: Ctx) -> subprocess.CompletedProcess:
    assert c.infer("echo").status_code == 200  # loaded: the server holds its cache
    return cm(c.server.env, "cache", "rm", "echo", check=False)


CLI["cache-size-limit"] = lambda c: cm(c.local, "pull", str(c.origins / "digits-svm"),
                                       "--name", "err-small", "--size-limit", "0.0000001",
                                       check=False)
CLI["checksum-mismatch"] = lambda c: cm(c.local, "pull", c.origin.url("/w.bin"), "--sha256",
                                        "0" * 64, check=False)
CLI["origin-refuses"] = lambda c: cm(c.local, "pull", c.origin.url("/refused.bin"), check=False)
CLI["origin-fails"] = lambda c: cm({**c.local, "CACHEMESH_FETCH_RETRIES": "1",
                                    "CACHEMESH_RETRY_BACKOFF": "0.01"},
                                   "pull", c.origin.url("/failing.bin"), check=False)


@provokes(CLI, "store-unusable")
def _(c: Ctx) -> subprocess.CompletedProcess:
    a_file = c.origins.parent / "a-file"
    a_file.write_text("not a folder")
    return cm(environ(a_file / "home"), "cache", "ls", check=False)


@provokes(CLI, "store-from-the-future")
def _(c: Ctx) -> subprocess.CompletedProcess:
    home = c.origins.parent / "future-home"
    cm(environ(home), "cache", "ls")
    with sqlite3.connect(home / "meta.db") as db:
        db.execute("PRAGMA user_version = 9999")  # as a newer cachemesh would leave it
    return cm(environ(home), "cache", "ls", check=False)


@provokes(CLI, "converter-fails")
def _(c: Ctx) -> subprocess.CompletedProcess:
    # A checkpoint whose header promises more bytes than the file holds: the splitter's
    # safetensors library fails on it, inside the job.
    folder = c.origins / "truncated-checkpoint"
    folder.mkdir(exist_ok=True)
    header = json.dumps({"model.layers.0.self_attn.o_proj.weight": {
        "dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 16)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 4}))
    return cm(c.local, "convert", str(folder), "--tp", "2", "-q", check=False)


@provokes(CLI, "load-raises")
def _(c: Ctx) -> subprocess.CompletedProcess:
    good = toy_spec(c.origins, "err-roll-1")
    bad = toy_spec(c.origins, "err-roll-2", load_fail="raise")
    versions = {"v1": {k: good[k] for k in ("source", "runtime", "parameters")}}
    assert _apply(c, {"name": "err-roll", "versions": versions}, "roll").returncode == 0
    versions["v2"] = {k: bad[k] for k in ("source", "runtime", "parameters")}
    return _apply(c, {"name": "err-roll", "versions": versions, "traffic": {"v2": 100}}, "roll")


CLI["server-unreachable"] = lambda c: cm(c.remote, "models", "--url",
                                         f"http://127.0.0.1:{free_port()}", "ls", check=False)


@pytest.mark.parametrize("scenario", sorted(CLI))
def test_exit_code(ctx: Ctx, scenario: str):
    proc = CLI[scenario](ctx)
    assert proc.returncode == TABLE[scenario].exit, proc.stderr
    assert proc.stderr.startswith("error: ") and CLI_SAYS[scenario] in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# -- the table itself ---------------------------------------------------------------------

def test_every_error_class_has_a_row_or_a_reason():
    classes = {obj for obj in vars(e).values()
               if isinstance(obj, type) and issubclass(obj, e.CachemeshError)}
    in_rows = {row.error for row in TABLE.values()}
    assert not in_rows & set(NOT_PROVOKED)
    assert classes == in_rows | set(NOT_PROVOKED)


def test_every_surface_a_row_names_is_provoked():
    from tests.blackbox import test_error_limits as limits

    for surface, here, there in (("http", REST, limits.REST), ("grpc", GRPC, limits.GRPC),
                                 ("exit", CLI, limits.CLI)):
        named = {s for s, row in TABLE.items() if getattr(row, surface) is not None}
        assert not set(here) & set(there)
        assert set(here) | set(there) == named, surface
