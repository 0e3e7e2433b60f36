"""No output shows a presigned URL's signature (issue 22, item 3).

A real ``cachemesh serve`` process deploys a model and declares a data cache
from URLs that carry a planted signature in their query, pulls them, answers
with them; then every place a user or an operator reads is searched for it:
each control and V2 response, the SSE events, ``/metrics``, the CLI's
``--json`` listings, and the server's own log (where httpx logs every request
at INFO). The pull itself must still send the signature: the origin records it.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.emulators.http_origin import HttpOrigin
from tests.faults.conftest import ServeProcess, cli, home, servers, wait_for

__all__ = ["home", "servers"]  # the fault campaign's fixtures: a real server process

SIGNATURE = "PLANTEDSIG5f3c9a1e7b2d4c6e8a0f"
CREDENTIAL = "PLANTEDCRED0a9b8c7d6e5f"
QUERY = f"?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}&X-Amz-Expires=3600"


def test_redact_source_keeps_what_identifies_the_source() -> None:
    from cachemesh.sources.redact import redact_source, redact_text

    assert redact_source("hf://Org/Name@main") == "hf://Org/Name@main"
    assert redact_source("/data/a?b") == "/data/a?b"  # a path: '?' is a file-name character
    assert redact_source("s3://b/p?versionId=3") == "s3://b/p?versionId=***"
    shown = redact_source("https://u:pw@Host.example:8443/m.bin" + QUERY + "#frag")
    assert shown == ("https://Host.example:8443/m.bin"
                     "?X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Expires=***")
    assert redact_source("https://h/x?" + SIGNATURE) == "https://h/x?***"
    text = f'HTTP Request: GET http://127.0.0.1:9/m.bin{QUERY} "HTTP/1.1 200 OK"'
    assert SIGNATURE not in redact_text(text) and "/m.bin?X-Amz-Signature=***" in redact_text(text)


def _everything_shown(server: ServeProcess, home: Path) -> dict[str, str]:
    c = server.client
    shown: dict[str, str] = {}
    for path in ("/api/v1/models", "/api/v1/models/digits", "/api/v1/models/digits/stats",
                 "/api/v1/datacaches", "/api/v1/datacaches/blob",
                 "/api/v1/jobs", "/api/v1/nodes",
                 "/v2/repository/index", "/v2/models/digits", "/v2/models/digits/ready",
                 "/v2", "/metrics", "/openapi.json"):
        shown[path] = c.get(path).text
    with c.stream("GET", "/api/v1/datacaches/blob/events", timeout=5) as events:
        text = ""
        try:
            for chunk in events.iter_text():
                text += chunk
                if len(text) > 2000 or "Available" in text:
                    break
        except httpx.ReadTimeout:
            pass
        shown["/api/v1/datacaches/blob/events"] = text
    for args in (("cache", "ls", "--json"), ("cache", "status", "digits", "--json", "--events"),
                 ("cache", "status", "blob", "--json", "--events"), ("cache", "ls"),
                 ("cache", "status", "digits"), ("jobs", "ls", "--json"),
                 ("models", "--url", server.url, "ls", "--json")):
        out = cli(home, *args)
        shown["cachemesh " + " ".join(args)] = out.stdout + out.stderr
    shown["server log"] = server.log_path.read_text(errors="replace")
    return shown


def test_no_output_shows_a_planted_signature(home: Path, servers: list, digits_dir: Path,
                                             tmp_path: Path) -> None:
    with HttpOrigin() as origin:
        origin.files["/digits/model.joblib"] = (digits_dir / "model.joblib").read_bytes()
        origin.files["/blob.bin"] = b"plain bytes" * 1000
        model_url = origin.url("/digits/model.joblib") + QUERY
        server = ServeProcess(home, [], log=tmp_path / "serve.log",
                              env={"CACHEMESH_SERVE_GRPC_PORT": "0"})  # 8033 may be taken
        servers.append(server)
        server.wait_live()
        c = server.client
        deployed = c.post("/api/v1/models", json={"name": "digits", "source": model_url,
                                                  "runtime": "sklearn"})
        assert deployed.status_code == 201, deployed.text
        answer = c.post("/v2/models/digits/infer", json={"inputs": [
            {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
        assert answer.status_code == 200, answer.text
        declared = c.post("/api/v1/datacaches", json={"name": "blob",
                                                      "source": origin.url("/blob.bin") + QUERY})
        assert declared.status_code in (200, 201, 202), declared.text
        wait_for(lambda: c.get("/api/v1/datacaches/blob").json().get("status") == "Available",
                 60, "the data cache to be pulled")
        # GET | PUT of the document as shown (redacted) is no change, not a new source.
        doc = c.get("/api/v1/models/digits").json()
        again = c.put("/api/v1/models/digits", json=doc)
        assert again.status_code == 200, again.text
        # The pull needed the signature, and sent it.
        sent = [path for _, path, _ in origin.requests]
        assert any(SIGNATURE in p for p in sent if p.startswith("/digits/"))
        assert any(SIGNATURE in p for p in sent if p.startswith("/blob.bin"))
        shown = _everything_shown(server, home)
    assert "X-Amz-Signature=***" in shown["/api/v1/models/digits"]
    assert "HTTP Request" in shown["server log"]  # httpx's INFO lines are there, redacted
    leaks = {where: text for where, text in shown.items()
             if SIGNATURE in text or CREDENTIAL in text}
    assert not leaks, json.dumps({w: t[:2000] for w, t in leaks.items()}, indent=1)
