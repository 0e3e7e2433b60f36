"""The same errors through the other adapters: the control API's routes, the datacache API,
readiness (an answer, not an error), and the statuses the CLI turns into exit codes.

test_error_table.py provokes each row once per surface; here a few rows go through
every route family that maps errors, so that an adapter that stopped using the
shared mapping would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.blackbox.conftest import Server, cm, toy_model, toy_spec
from tests.blackbox.error_table import TABLE


@pytest.fixture(scope="module")
def models(server: Server, origins: Path) -> Server:
    server.deploy(toy_spec(origins, "adp-toy"))
    return server


def status_and_error(r: Any) -> tuple[int, str]:
    error = r.json()["error"]
    assert isinstance(error, str) and error
    return r.status_code, error


def test_the_control_api_maps_errors_as_the_v2_routes_do(models: Server):
    s = models
    missing = TABLE["unknown-model"].http
    for method, path in (("GET", "/api/v1/models/no-such-model"),
                         ("DELETE", "/api/v1/models/no-such-model"),
                         ("GET", "/api/v1/models/no-such-model/stats"),
                         ("GET", "/v2/models/no-such-model"),
                         ("GET", "/v2/models/no-such-model/ready"),
                         ("POST", "/v2/repository/models/no-such-model/load"),
                         ("POST", "/v2/repository/models/no-such-model/unload")):
        headers = s.control if "/api/" in path or "/repository/" in path else s.infer
        code, error = status_and_error(s.http.request(method, path, headers=headers))
        assert (code, error) == (missing, "no model named 'no-such-model'"), path

    # A body the API cannot take: 400 in the server's own shape, FastAPI's refusals included.
    code, error = status_and_error(s.http.post("/api/v1/models", headers=s.control,
                                               json={"name": "adp-no-source"}))
    assert (code, error.split(":")[0]) == (400, "invalid request")
    code, error = status_and_error(s.http.put("/api/v1/models/adp-toy", headers=s.control,
                                              content=b"not json"))
    assert code == 400 and "not a JSON document" in error
    # The control API's own body limit (1 MiB by default) is the 413 of the table.
    big = {"name": "adp-big", "source": "x" * 2**20}
    code, _ = status_and_error(s.http.post("/api/v1/models", headers=s.control, json=big))
    assert code == TABLE["body-too-large"].http


def test_the_datacache_api_maps_errors_alike(models: Server, origins: Path):
    s = models
    source = str(origins / "digits-svm")
    code, error = status_and_error(s.http.post("/api/v1/datacaches", headers=s.control,
                                               json={"name": "../up", "source": source}))
    assert code == 400 and "name" in error
    code, error = status_and_error(s.http.post("/api/v1/datacaches", headers=s.control, json={
        "name": "adp-secure", "source": source, "bucket": "secure"}))
    assert (code, error) == (TABLE["protected-bucket"].http,
                             "bucket 'secure' is protected; the request does not carry its token")
    code, error = status_and_error(s.http.post("/api/v1/datacaches", headers=s.control,
                                               json={"name": "echo", "source": source}))
    assert code == TABLE["name-taken"].http
    assert error.startswith("cache 'echo' exists with a different spec")
    for method in ("GET", "DELETE"):
        r = s.http.request(method, "/api/v1/datacaches/no-such-cache", headers=s.control)
        assert status_and_error(r) == (TABLE["unknown-cache"].http,
                                       "no cache named 'no-such-cache'")
    # A protected bucket's caches do not exist for a caller without its token.
    r = s.http.get("/api/v1/datacaches", headers=s.control)
    assert "secure" not in {c["bucket"] for c in r.json()["datacaches"]}


def test_not_ready_is_an_answer_not_an_error(models: Server):
    import tritonclient.grpc as tg

    s = models
    s.http.post("/v2/repository/models/adp-toy/unload", headers=s.control)
    r = s.http.get("/v2/models/adp-toy/ready", headers=s.infer)
    assert (r.status_code, r.json()) == (400, {"name": "adp-toy", "ready": False})
    client = s.grpc()
    assert client.is_model_ready("adp-toy", headers=s.infer) is False
    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    client.infer("adp-toy", [x], headers=s.infer)  # loads it
    assert client.is_model_ready("adp-toy", headers=s.infer) is True
    r = s.http.get("/v2/models/adp-toy/ready", headers=s.infer)
    assert (r.status_code, r.json()) == (200, {"name": "adp-toy", "ready": True})
    assert s.http.get("/v2/health/ready").json() == {"ready": True}
    assert client.is_server_ready() is True  # health needs no token


def test_the_cli_turns_each_server_status_into_its_exit_code(models: Server, origins: Path):
    env = {**models.env, "CACHEMESH_URL": models.url}
    source = str(toy_model(origins, "adp-cli"))
    cases = [  # (arguments, exit code, what the server answered)
        (["models", "deploy", "adp-cli", "gopher://host/m"], 2, "(HTTP 400)"),
        (["models", "deploy", "adp-cli", "/etc"], 2, "(HTTP 400)"),
        (["models", "deploy", "adp-cli", source, "--bucket", "secure"], 6, "(HTTP 403)"),
        (["models", "rm", "no-such-model"], 3, "(HTTP 404)"),
        (["models", "deploy", "adp-toy", source], 4, "(HTTP 409)"),
        (["models", "deploy", "adp-cli", source, "--param", "no-equals-sign"], 2, "KEY=VALUE"),
        (["models", "rm", ".."], 2, "invalid model name"),
    ]
    for args, code, says in cases:
        proc = cm(env, *args, check=False)
        assert (proc.returncode, proc.stdout) == (code, ""), (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and says in proc.stderr, (args, proc.stderr)
