"""Bearer tokens: which paths need which token, the 401/403 answers, and the CLI's side."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from starlette.routing import Mount, Route

from cachemesh.access import CONTROL, INFERENCE, METRICS, OPEN, Keyring, Principal
from cachemesh.cli import main
from cachemesh.config import Settings
from cachemesh.errors import ForbiddenError, InvalidInputError, UnauthorizedError
from cachemesh.serve.adapters.app import create_app
from cachemesh.serve.adapters.auth import access_of, credentials
from cachemesh.serve.core.registry import MemoryModelRegistry
from cachemesh.serve.core.service import ModelService
from tests.security.conftest import (
    AS_CONTROL,
    AS_INFERENCE,
    AS_METRICS,
    BUCKET_TOKEN,
    CONTROL_TOKEN,
    INFERENCE_TOKEN,
    METRICS_TOKEN,
)

V2_BODY = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
OPEN_PATHS = {"/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs",
              "/docs/assets", "/redoc", "/ui", "/ui/", "/ui/ui.js", "/ui/ui.css"}


def all_routes(app) -> list[tuple[str, frozenset[str]]]:
    """(path template, methods) of every route, the mounted FastAPI app's included."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount) and hasattr(route.app, "routes"):
            found += all_routes(route.app)
        elif isinstance(route, Mount):  # static files
            found.append((route.path, frozenset({"GET", "HEAD"})))
        elif isinstance(route, Route) or hasattr(route, "methods"):
            found.append((route.path, frozenset(route.methods or {"GET"})))
    return found


def test_every_route_gets_the_access_class_its_path_promises(tmp_path: Path):
    settings = Settings.from_env({"CACHEMESH_HOME": str(tmp_path / "home")})
    app = create_app(ModelService(settings, registry=MemoryModelRegistry()))
    routes = all_routes(app)
    assert len(routes) > 15
    for template, methods in routes:
        path = template.replace("{model}", "m").replace("{version}", "1").replace("{name}", "n")
        for method in methods:
            access = access_of(method, path)
            if path in OPEN_PATHS:
                assert access == OPEN, (method, path)
            elif path == "/metrics":
                assert access == METRICS
            elif path.startswith(("/api/", "/v2/repository/")):
                assert access == CONTROL, (method, path)
            elif path == "/v2" or path.startswith(("/v2/models/", "/v1/")):
                assert access == INFERENCE, (method, path)
            else:  # a route nobody classified: the strictest class, never open
                assert access == CONTROL, (method, path)


@pytest.mark.parametrize("path", [
    "/v2/health/live/../../api/v1/models", "/v2/health/live/..", "//v2/health/live",
    "/v2/health/live/", "/v2/models/../../api/v1/models", "/v2/models/./x/infer",
    "/docs/../api/v1/models", "/ui/../api/v1/models", "/v2/health/live\\..\\x",
    "/v2/health/live\x00", "/nothing-here",
    "/", "",
])
def test_unclassified_and_dotted_paths_are_control(path: str):
    assert access_of("GET", path) == CONTROL


def test_only_reads_of_the_docs_are_open():
    assert access_of("GET", "/openapi.json") == OPEN
    assert access_of("POST", "/openapi.json") == CONTROL
    assert access_of("DELETE", "/docs") == CONTROL
    assert access_of("GET", "/ui/ui.js") == OPEN
    assert access_of("POST", "/ui") == CONTROL


def test_keyring_grants_and_refusals():
    keys = Keyring(control="c" * 32, inference="i" * 32, metrics="m" * 32)
    assert keys.authenticate(OPEN).scopes == frozenset()
    assert keys.authenticate(CONTROL, ["c" * 32]).scopes == {CONTROL, INFERENCE, METRICS}
    assert keys.authenticate(INFERENCE, ["i" * 32]).scopes == {INFERENCE}
    assert keys.authenticate(METRICS, ["m" * 32]).scopes == {METRICS}
    with pytest.raises(UnauthorizedError) as missing:
        keys.authenticate(CONTROL)
    assert not missing.value.invalid
    with pytest.raises(UnauthorizedError) as wrong:
        keys.authenticate(CONTROL, ["c" * 31])
    assert wrong.value.invalid
    with pytest.raises(ForbiddenError) as scope:
        keys.authenticate(CONTROL, ["i" * 32])
    assert scope.value.scope == CONTROL
    with pytest.raises(ForbiddenError):
        keys.authenticate(METRICS, ["i" * 32])
    # A token that is not the server's is kept: it may open a protected bucket.
    principal = keys.authenticate(CONTROL, ["c" * 32], ["bucket-token"])
    assert principal.tokens == ("c" * 32, "bucket-token")
    assert "bucket-token" not in repr(principal) and "c" * 32 not in repr(principal)
    # Past the first eight tokens, or longer than any token of ours: not looked at.
    assert len(keys.authenticate(CONTROL, ["c" * 32] + ["x"] * 9, ["y"] * 4).tokens) == 8
    with pytest.raises(UnauthorizedError) as long:
        keys.authenticate(CONTROL, ["c" * 5000])
    assert long.value.invalid
    assert keys.authenticate(CONTROL, ["x" * 5000, "c" * 32]).scopes >= {CONTROL}
    # An open endpoint (health) looks at no token at all.
    assert keys.authenticate(OPEN, ["x" * 9000] * 20, ["y"] * 20) == Principal()
    with pytest.raises(InvalidInputError):
        Keyring(control="short")


def test_without_tokens_everything_is_open_and_metrics_follow_the_control_token():
    open_ring = Keyring()
    for access in (OPEN, INFERENCE, METRICS, CONTROL):
        assert open_ring.requires(access) is None
        assert open_ring.authenticate(access, ["anything"]).scopes == frozenset()
    control_only = Keyring(control="c" * 32)
    assert control_only.requires(INFERENCE) is None
    assert control_only.requires(METRICS) == METRICS  # names every model: not left open
    assert control_only.authenticate(METRICS, ["c" * 32]).scopes >= {METRICS}


def test_credentials_are_read_from_authorization_and_the_bucket_header():
    bearer, others = credentials([
        (b"authorization", b"Bearer  tok-1 "), (b"authorization", b"Basic dXNlcjpwYXNz"),
        (b"x-cachemesh-bucket-token", b"b1, b2,,"), (b"cookie", b"token=nope")])
    assert bearer == ["tok-1"] and others == ["b1", "b2"]
    assert credentials([(b"authorization", b"bearer x")]) == (["x"], [])
    assert credentials([(b"authorization", b"Bearer")]) == ([], [])


# -- over HTTP --------------------------------------------------------------------

CASES = [  # method, path, body, access
    ("GET", "/v2", None, INFERENCE),
    ("GET", "/v2/models/echo", None, INFERENCE),
    ("GET", "/v2/models/echo/ready", None, INFERENCE),
    ("POST", "/v2/models/echo/infer", V2_BODY, INFERENCE),
    ("GET", "/metrics", None, METRICS),
    ("GET", "/api/v1/models", None, CONTROL),
    ("POST", "/api/v1/models", {"name": "nope", "source": "nope://x"}, CONTROL),
    ("GET", "/api/v1/models/echo", None, CONTROL),
    ("DELETE", "/api/v1/models/does-not-exist", None, CONTROL),
    ("GET", "/v2/repository/index", None, CONTROL),
    ("POST", "/v2/repository/models/echo/load", {}, CONTROL),
    ("GET", "/api/v1/datacaches", None, CONTROL),
    ("POST", "/api/v1/datacaches", {"name": "nope", "source": "nope://x"}, CONTROL),
    ("GET", "/api/v1/datacaches/ghost", None, CONTROL),
    ("GET", "/api/v1/datacaches/ghost/events", None, CONTROL),
    ("DELETE", "/api/v1/datacaches/ghost", None, CONTROL),
]
GOOD = {INFERENCE: AS_INFERENCE, METRICS: AS_METRICS, CONTROL: AS_CONTROL}
OTHER_SCOPE = {INFERENCE: AS_METRICS, METRICS: AS_INFERENCE, CONTROL: AS_INFERENCE}


@pytest.mark.parametrize("method,path,body,access", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_each_endpoint_needs_its_token(secured, method, path, body, access):
    c = secured.client

    def call(headers=None):
        return c.request(method, path, json=body, headers=headers or {})

    missing = call()
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="cachemesh"'
    assert "bearer token" in missing.json()["error"]
    wrong = call({"Authorization": "Bearer not-a-token-of-this-server"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="cachemesh", error="invalid_token"'
    other = call(OTHER_SCOPE[access])
    assert other.status_code == 403
    assert 'error="insufficient_scope"' in other.headers["www-authenticate"]
    assert f'scope="{access}"' in other.headers["www-authenticate"]
    for headers in (GOOD[access], AS_CONTROL):  # the control token is good everywhere
        good = call(headers)
        assert good.status_code not in (401, 403), good.text
        assert good.status_code < 500, good.text


def test_health_and_docs_stay_open(secured):
    for path in ("/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs",
                 "/docs/assets/swagger-ui.css",
                 "/ui", "/ui/ui.js", "/ui/ui.css"):  # the page's files hold no data
        assert secured.client.get(path).status_code == 200, path


def test_tokens_in_the_query_string_or_a_cookie_count_for_nothing(secured):
    c = secured.client
    for params in ({"token": CONTROL_TOKEN}, {"access_token": CONTROL_TOKEN}):
        assert c.get("/api/v1/models", params=params).status_code == 401
    assert c.get("/api/v1/models", headers={"Cookie": f"token={CONTROL_TOKEN}"}).status_code == 401
    # Basic auth with the token as a password is not a bearer token either.
    assert c.get("/api/v1/models", auth=("admin", CONTROL_TOKEN)).status_code == 401
    # The scheme is case-insensitive (RFC 7235); surrounding blanks do not matter.
    r = c.get("/api/v1/models", headers={"Authorization": f"bearer   {CONTROL_TOKEN}"})
    assert r.status_code == 200


def test_a_token_that_differs_in_one_character_or_is_a_prefix_is_refused(secured):
    c = secured.client
    for bad in (CONTROL_TOKEN[:-1], CONTROL_TOKEN + "x", CONTROL_TOKEN[:-1] + "0",
                CONTROL_TOKEN.upper(), INFERENCE_TOKEN + CONTROL_TOKEN, BUCKET_TOKEN):
        assert c.get("/api/v1/models", headers={"Authorization": f"Bearer {bad}"}
                     ).status_code == 401


def test_refusal_does_not_read_the_body(secured):
    """A client without a token that announces 1 GiB gets 401 at once, and the
    connection closes instead of the server draining the gigabyte."""
    host, port = secured.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 1073741824\r\n\r\n" + b"{" * 1000)
        started = time.monotonic()
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 401"), head[:200]
        assert b"connection: close" in head.lower()
        assert time.monotonic() - started < 5
    assert secured.client.get("/v2/health/live").status_code == 200


# -- the CLI ------------------------------------------------------------------------

def test_models_cli_sends_the_control_and_bucket_tokens(secured):
    runner = CliRunner()
    url = ["models", "--url", secured.url]
    r = runner.invoke(main, [*url, "ls", "--json"], env={"CACHEMESH_API_TOKEN": None})
    assert r.exit_code == 6, r.output
    assert "bearer token" in r.output and "CACHEMESH_API_TOKEN" in r.output
    r = runner.invoke(main, [*url, "ls", "--json"], env={"CACHEMESH_API_TOKEN": "wrong-token"})
    assert r.exit_code == 6 and "wrong-token" not in r.output
    r = runner.invoke(main, [*url, "ls", "--json"], env={"CACHEMESH_API_TOKEN": CONTROL_TOKEN})
    assert r.exit_code == 0, r.output
    assert "echo" in r.output and "secret" not in r.output
    r = runner.invoke(main, [*url, "ls", "--json"], env={
        "CACHEMESH_API_TOKEN": CONTROL_TOKEN, "CACHEMESH_BUCKET_TOKEN": f"other,{BUCKET_TOKEN}"})
    assert r.exit_code == 0 and '"secret"' in r.output
    # The inference token is not a control token: 403, exit code 6.
    r = runner.invoke(main, [*url, "ls"], env={"CACHEMESH_API_TOKEN": INFERENCE_TOKEN})
    assert r.exit_code == 6 and "HTTP 403" in r.output
    assert METRICS_TOKEN  # (used by the HTTP cases above)
