"""Every endpoint, fuzzed (see fuzzing.py): never a 5xx, never a crash, healthy after.

``CACHEMESH_FUZZ_EXAMPLES`` sets the cases per endpoint (default 60: the whole
directory stays near a minute on two cores); ``CACHEMESH_FUZZ_SEED=random``
draws new cases instead of the same derandomized ones (benchmarks/fuzz.py runs
long, random campaigns and writes the figures into docs/security.md);
``CACHEMESH_FUZZ_REPORT`` names a JSON file that receives the counts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from cachemesh.access import CONTROL, INFERENCE, METRICS
from cachemesh.config import Settings
from cachemesh.serve.adapters.server import make_server
from cachemesh.serve.core.registry import MemoryModelRegistry
from cachemesh.serve.core.service import ModelService
from tests.security.conftest import (
    AS_CONTROL,
    AS_INFERENCE,
    BUCKET_TOKEN,
    CONTROL_TOKEN,
    INFERENCE_TOKEN,
    METRICS_TOKEN,
    PROTECTED,
    SECRETS,
    WITH_BUCKET,
    toy,
)
from tests.security.fuzzing import Endpoint, Outcome, Pools, Runner, cases, check, discover

EXAMPLES = int(os.environ.get("CACHEMESH_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("CACHEMESH_FUZZ_SEED", "") == "random"
TOKENS = {CONTROL: CONTROL_TOKEN, INFERENCE: INFERENCE_TOKEN, METRICS: METRICS_TOKEN}
V2 = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def _endpoints() -> list[Endpoint]:
    """The endpoints of the app exactly as `cachemesh serve` builds it."""
    with tempfile.TemporaryDirectory() as home:
        s = Settings.from_env({"CACHEMESH_HOME": home})
        server = make_server(s, service=ModelService(s, registry=MemoryModelRegistry()))
        return discover(server.config.app)


ENDPOINTS = _endpoints()
OUTCOME = Outcome()


def test_discovery_finds_the_v2_and_control_endpoints_and_matches_the_live_schema(secured):
    ids = {e.id for e in ENDPOINTS}
    for expected in ("POST /v2/models/{model}/infer", "POST /v2/models/{model}/versions/{version}"
                     "/infer", "GET /v2/health/ready", "POST /v2/repository/models/{model}/load",
                     "GET /metrics", "POST /api/v1/models", "DELETE /api/v1/models/{name}"):
        assert expected in ids
    live = secured.client.get("/openapi.json").json()["paths"]
    from_schema = {f"{m.upper()} {p}" for p, ops in live.items() for m in ops}
    assert from_schema == {e.id for e in ENDPOINTS if e.source == "openapi"}


def test_openai_endpoints_are_fuzzed():
    openai = {e.id: e for e in ENDPOINTS if e.path.startswith("/v1/")}
    assert {"GET /v1/models", "GET /v1/models/{model}", "POST /v1/completions",
            "POST /v1/chat/completions", "POST /v1/embeddings"} <= set(openai)
    assert all(e.access == INFERENCE for e in openai.values())
    # Bodies are drawn from the request schemas, so handlers are reached.
    assert all(openai[k].schema for k in openai if k.startswith("POST"))


@pytest.fixture(scope="module")
def pools(secured) -> Pools:
    root, home = secured.models_root, secured.home
    valid = toy(root, "fz-model")
    return Pools(
        models=["echo", "digits", "secret", "parrot"], protected=["secret"],
        buckets=["models", PROTECTED, "fz-bucket", "..", "a/b", "x" * 200, "", "\u00e9"],
        sources=[valid.source, str(root / "missing"), str(root / "missing" / ".." / ".." / "etc"),
                 str(root / "toy-file-does-not-exist.py"), "/etc", "../../../etc", ".", "/",
                 "~", str(home), str(home / "blobs"), str(home / "meta.db"),
                 str(home / "buckets"), str(home / "buckets" / PROTECTED), "file:///etc/passwd",
                 f"file://{root}/missing", "file://remote-host/x", "nope://x", "hf://",
                 "hf://../x", "hf://org/model@main", "ms://org/m", "s3://bucket/key", "mem://x",
                 "", " ", "\x00", "%2e%2e", "a" * 5000],
        valid_source=valid.source, valid_config={"class": "toy:Echo"})


@pytest.fixture(scope="module")
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """Every log record at ERROR or above while fuzzing (uvicorn's 'Exception in ASGI
    application' included): a crash that still produced some answer shows up here."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.ERROR)
    logging.getLogger().addHandler(handler)
    yield records
    logging.getLogger().removeHandler(handler)
    report = os.environ.get("CACHEMESH_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({
            "examples_per_endpoint": EXAMPLES, "random": RANDOM,
            "endpoints": {e.id: {"sent": OUTCOME.sent[e.id], "unsendable": OUTCOME.unsendable[e.id],
                                 "seconds": round(OUTCOME.seconds[e.id], 3),
                                 "statuses": dict(OUTCOME.statuses.get(e.id, {}))}
                          for e in ENDPOINTS}}, indent=2))


@pytest.mark.parametrize("ep", ENDPOINTS, ids=[e.id for e in ENDPOINTS])
def test_no_request_gets_a_5xx(secured, pools: Pools, server_errors, ep: Endpoint):
    runner = Runner(secured.url, {**AS_CONTROL, **WITH_BUCKET}, OUTCOME,
                    keep={*pools.models, "faulty"})
    before = len(server_errors)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(ep, pools, TOKENS, BUCKET_TOKEN))
    def one(case) -> None:
        r = runner.send(ep, case)
        if r is not None:
            check(ep, case, r, SECRETS)

    try:
        one()
    finally:
        runner.close()
    assert OUTCOME.sent[ep.id] >= EXAMPLES // 2, OUTCOME.unsendable[ep.id]
    errors = [f"{r.name}: {r.getMessage()}" for r in server_errors[before:]]
    assert not errors, errors
    # Healthy afterwards: ready, the models answer, the worker is alive.
    c = secured.client
    assert c.get("/v2/health/ready").status_code == 200
    assert c.post("/v2/models/echo/infer", json=V2, headers=AS_INFERENCE).status_code == 200
    r = c.post("/v2/models/secret/infer", json=V2, headers={**AS_INFERENCE, **WITH_BUCKET})
    assert r.status_code == 200
    names = {m["name"] for m in c.get("/api/v1/models", headers=AS_CONTROL).json()["models"]}
    assert {"echo", "digits", "faulty"} <= names


def test_a_fault_of_the_model_is_still_a_5xx(secured):
    """No catch-all: a valid request to a model that raises in predict is 500, and the
    server serves the next request."""
    c = secured.client
    r = c.post("/v2/models/faulty/infer", json=V2, headers=AS_INFERENCE)
    assert r.status_code == 500, r.text
    assert "faulty toy failed" in r.json()["error"]
    assert c.post("/v2/models/echo/infer", json=V2, headers=AS_INFERENCE).status_code == 200
    assert c.get("/v2/health/ready").status_code == 200


def test_a_generative_model_without_predict_is_a_4xx_on_v2(secured):
    """parrot has only the generate/stream hooks: V2 inference asks what it does not do."""
    r = secured.client.post("/v2/models/parrot/infer", json=V2, headers=AS_INFERENCE)
    assert r.status_code == 400, r.text
    assert "generates" in r.json()["error"]
