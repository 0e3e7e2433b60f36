"""Property-based fuzzing of every HTTP endpoint of the server (hypothesis).

Endpoints are discovered, not listed: :func:`discover` walks the routes of the
app exactly as ``make_server`` builds it. Plain Starlette routes (KServe V2,
/metrics) come from the route table; everything under the mounted FastAPI app
(the control API, and whatever routers are added later: datacaches, OpenAI)
comes from its OpenAPI schema, request bodies included. A new endpoint is
fuzzed the day it is mounted, with no change here.

Each fuzz case is one HTTP request to a real server (uvicorn on loopback):

- path parameters from a pool of real names (models that exist, one in a
  protected bucket) and hostile ones (``..``, ``%2e%2e``, NUL, backslashes,
  very long names, look-alike unicode, random text);
- a body built for the endpoint: from its JSON schema (valid, then mutated:
  keys dropped, types swapped, keys added), a KServe V2 inference request
  (JSON, binary extension, gRPC-JSON; consistent or not), or garbage (random
  bytes, invalid UTF-8, documents nested thousands deep, huge numbers);
- headers: the right token most of the time (so handlers are reached), a
  wrong, missing or other-scope one otherwise; content types and encodings
  (gzip, deflate, broken gzip, unknown), the binary extension's header length.

The property: the answer is never a 5xx and the server stays healthy.
Sources that a fuzzed deploy may name are a valid toy model, nonexistent paths
under the server's deployable root, paths it must refuse (outside the root,
inside the store), and schemes it does not know: never a folder it would copy.
Models a fuzz case deploys are removed right after it, so cases stay
independent; the models every case may address are never removed or unloaded
for good.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st
from starlette.routing import Mount, Route

from cachemesh.access import CONTROL, OPEN
from cachemesh.serve.adapters.auth import access_of

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES"]
HOSTILE = [
    "..", ".", "...", "../..", "../../etc/passwd", "%2e%2e", "%2e%2e%2f", "..%2f..%2fapi",
    "%252e%252e", "/etc/passwd", "\\..\\..\\windows", "a\\b", "a/b", "a\x00b", "\x00",
    "%00", "a%00b", "%", "%zz", "?x=1", "#frag", "\r\nX-Injected: 1", "\t", " ",
    "\uff45\uff43\uff48\uff4f",  # fullwidth "echo"
    "\u202eohce", "e\u0301cho", "echo\u200b", "ECHO", " echo", "echo ", "\ufeffecho",
    "\u0435cho",  # Cyrillic e
    "x" * 129, "x" * 300, "y" * 5000, "\U0001f4a5", "\u00ff\u00fe",
    "-rf", "$(id)", "`id`", "'; DROP TABLE caches; --", "{model}", "*", "models",
]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # template: /v2/models/{model}/infer
    params: tuple[str, ...]
    schema: dict | None = None  # JSON schema of the request body (OpenAPI operations)
    query: tuple[tuple[str, dict], ...] = ()  # (name, schema) of query parameters
    source: str = "route"  # "route" (the route table) or "openapi"

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def access(self) -> str:
        return access_of(self.method, self.path.replace("{", "").replace("}", ""))


def _params(path: str) -> tuple[str, ...]:
    return tuple(re.findall(r"{([^}:]+)(?::[^}]*)?}", path))


def _resolve(schema: Any, components: dict, refs: int = 0) -> Any:
    """The schema with every $ref inlined (recursive schemas cut after a few $refs).

    Only $refs count towards the cut: counting every level once turned the leaves of
    nested bodies (the OpenAI messages' parts) into ``{}``."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            if refs > 8:
                return {}
            name = schema["$ref"].rsplit("/", 1)[-1]
            return _resolve(components.get(name, {}), components, refs + 1)
        return {k: _resolve(v, components, refs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve(v, components, refs) for v in schema]
    return schema


def discover(app: Any) -> list[Endpoint]:
    """Every (method, path) the app serves: its route table, and the OpenAPI schema of
    each mounted app that has one."""
    found: list[Endpoint] = []
    for route in app.routes:
        if isinstance(route, Mount):
            sub = route.app
            if hasattr(sub, "openapi"):
                found += _from_openapi(sub.openapi())
            elif hasattr(sub, "routes"):
                found += discover(sub)
            # else: static files (the /docs assets): no parameters to fuzz
        elif isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    found.append(Endpoint(method, route.path, _params(route.path)))
    return found


def _from_openapi(doc: dict) -> list[Endpoint]:
    components = doc.get("components", {}).get("schemas", {})
    found = []
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if method.upper() not in {"GET", "POST", "PUT", "PATCH", "DELETE"}:
                continue
            body = op.get("requestBody", {}).get("content", {})
            schema = None
            for ctype, content in body.items():
                if "json" in ctype:
                    schema = _resolve(content.get("schema", {}), components)
            query = tuple((p["name"], _resolve(p.get("schema", {}), components))
                          for p in op.get("parameters", []) if p.get("in") == "query")
            found.append(Endpoint(method.upper(), path, _params(path), schema, query, "openapi"))
    return found


# -- values -------------------------------------------------------------------------

def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=10), c, max_size=4),
                        max_leaves=max_leaves)


def deep(n: int, kind: str) -> str:
    """A JSON document nested ``n`` deep (built as text: serializers refuse it too)."""
    if kind == "list":
        return "[" * n + "1" + "]" * n
    return '{"a":' * n + "1" + "}" * n


@st.composite
def garbage_body(draw: Callable) -> bytes:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if choice == 2:
        return deep(draw(st.integers(30, 5000)), draw(st.sampled_from(["list", "dict"]))).encode()
    if choice == 3:
        return json.dumps(draw(json_values())).encode()
    if choice == 4:
        return draw(st.sampled_from([b"", b"null", b"{}", b"[]", b"1e999999", b"-0", b"NaN",
                                     b'{"a":1,"a":2}', b"\xef\xbb\xbf{}", b"\xff\xfe{}",
                                     b'{"inputs":', b'"\\ud800"', b"{" * 10000,
                                     b"[" + b"1," * 20000 + b"1]"]))
    if choice == 5:
        return ("[" + ",".join(["0"] * draw(st.integers(1000, 50000))) + "]").encode()
    return json.dumps(draw(json_values(30))).encode()


@dataclass
class Pools:
    """What path parameters and well-known fields are drawn from."""

    models: list[str]  # models that exist and must stay (never unloaded for good)
    protected: list[str]  # of those, the ones in a protected bucket
    buckets: list[str]
    sources: list[str]  # sources a fuzzed deploy may name (see the module docstring)
    valid_source: str  # the one real model among them
    valid_config: dict[str, Any]  # its runtime parameters
    disposable: list[str] = field(default_factory=lambda: ["fz-a", "fz-b", "fz-c"])

    def names(self, destructive: bool) -> st.SearchStrategy[str]:
        real = self.disposable if destructive else self.models + self.disposable
        hostile = st.sampled_from(HOSTILE) | st.text(min_size=1, max_size=40)
        return st.integers(0, 9).flatmap(lambda i: st.sampled_from(real) if i < 6 else hostile)


def schema_values(schema: Any, overrides: dict[str, st.SearchStrategy], depth: int = 0
                  ) -> st.SearchStrategy[Any]:
    """Values that conform to ``schema`` (loosely: formats and patterns are ignored);
    properties named in ``overrides`` draw from there half of the time."""
    if not isinstance(schema, dict) or depth > 6:
        return json_values()
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([schema_values(s, overrides, depth + 1) for s in schema[key]])
    if "allOf" in schema and schema["allOf"]:
        return schema_values(schema["allOf"][0], overrides, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([schema_values({**schema, "type": k}, overrides, depth) for k in kind])
    if kind == "string":
        return st.text(max_size=schema.get("maxLength", 40))
    if kind == "integer":
        return st.integers(schema.get("minimum", -2**40), schema.get("maximum", 2**40))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers()
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(schema_values(schema.get("items", {}), overrides, depth + 1), max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))

        def prop(name: str) -> st.SearchStrategy:
            base = schema_values(props[name], overrides, depth + 1)
            if name not in overrides:
                return base
            # Mostly the pool (it reaches the handler), sometimes anything the schema allows.
            return st.integers(0, 4).flatmap(lambda i: base if i == 0 else overrides[name])

        return st.fixed_dictionaries({k: prop(k) for k in props if k in required},
                                     optional={k: prop(k) for k in props if k not in required})
    return json_values()


@st.composite
def mutated(draw: Callable, base: st.SearchStrategy[Any]) -> Any:
    """A valid value, then broken the way clients break them."""
    value = draw(base)
    if not isinstance(value, dict) or not value:
        return draw(json_values())
    value = dict(value)
    key = draw(st.sampled_from(sorted(value)))
    how = draw(st.integers(0, 4))
    if how == 0:
        del value[key]
    elif how == 1:
        value[key] = draw(json_values())
    elif how == 2:
        value[draw(st.text(max_size=12))] = draw(json_values())
    elif how == 3:
        value[key] = [value[key]] * draw(st.integers(2, 3))
    else:
        return [value]
    return value


def parameters(pools: Pools) -> st.SearchStrategy[Any]:
    grpc = st.dictionaries(st.text(max_size=8), st.fixed_dictionaries({}, optional={
        "int64_param": st.one_of(st.integers(), st.text(max_size=5), json_values()),
        "bool_param": json_values(), "string_param": json_values(),
        "double_param": json_values(), "uint64Param": st.text(max_size=5)}), max_size=3)
    nested = st.integers(20, 1000).map(lambda n: json.loads(deep(min(n, 900), "dict")))
    return st.one_of(st.dictionaries(st.text(max_size=10), json_values(), max_size=5), grpc,
                     nested, json_values())


# -- KServe V2 inference bodies -------------------------------------------------------

@st.composite
def tensor(draw: Callable, binary: list[bytes]) -> dict[str, Any]:
    if draw(st.integers(0, 4)):
        dtype = draw(st.sampled_from(DATATYPES))
    else:
        dtype = draw(st.sampled_from(["fp32", "FLOAT", "", "INT128"]) | st.text(max_size=6))
    dims = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    n = 1
    for d in dims:
        n *= d
    shape: Any = dims if draw(st.integers(0, 9)) else draw(st.one_of(
        st.lists(st.integers(-2**63, 2**64), max_size=3), json_values()))
    name = draw(st.sampled_from(["x", "input-0", "predict"]) | st.text(max_size=10))
    item: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
    # 0-1: JSON data as the shape says, 2: binary extension, 3: gRPC contents,
    # 4: data with parameters, 5: data of another shape or type, 6: no data
    form = draw(st.sampled_from([0, 0, 1, 2, 2, 3, 4, 5, 6]))
    values: list[Any]
    if dtype == "BYTES":
        values = draw(st.lists(st.text(max_size=6), min_size=n, max_size=n))
    elif dtype == "BOOL":
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif dtype.startswith(("INT", "UINT")):
        values = draw(st.lists(st.integers(-2**65, 2**65), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                               min_size=n, max_size=n))
    if form == 0:  # JSON data, flat
        item["data"] = values
    elif form == 1:  # nested as the shape says
        item["data"] = _nest(values, dims) if dims and n else values
    elif form == 5:
        item["data"] = draw(json_values())
    elif form == 2:  # the binary extension: raw bytes after the JSON header
        raw = draw(st.binary(max_size=64)) if draw(st.booleans()) else struct.pack(
            f"<{n}f", *[float(v) if isinstance(v, int | float) else 0.0 for v in values])
        binary.append(raw)
        item["parameters"] = {"binary_data_size": draw(st.sampled_from([len(raw)])
                                                       | st.integers(-5, 10**12) | json_values())}
    elif form == 3:  # gRPC-JSON contents
        field_name = draw(st.sampled_from(["fp32_contents", "int_contents", "bytes_contents",
                                           "int64Contents", "boolContents", "nope"]))
        item["contents"] = {field_name: draw(st.lists(json_values(4), max_size=6))}
    elif form == 4:
        item["parameters"] = draw(parameters_plain())
        item["data"] = values
    return item


def _nest(values: list[Any], dims: list[int]) -> Any:
    for d in reversed(dims[1:]):
        values = [values[i:i + d] for i in range(0, len(values), d)]
    return values


def parameters_plain() -> st.SearchStrategy[Any]:
    return st.dictionaries(st.text(max_size=10), json_values(), max_size=4)


@st.composite
def v2_request(draw: Callable, pools: Pools) -> tuple[bytes, dict[str, str]]:
    binary: list[bytes] = []
    doc: dict[str, Any] = {}
    pick = draw(st.integers(0, 19))
    if pick < 3:  # what the digits SVM takes: [n, 64] FP32
        rows = draw(st.integers(1, 3))
        doc["inputs"] = [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": draw(
            st.lists(st.floats(0, 16, width=32), min_size=64 * rows, max_size=64 * rows))}]
    elif pick < 19:
        doc["inputs"] = draw(st.lists(tensor(binary), min_size=1, max_size=3)
                             | st.lists(tensor(binary), max_size=0))
    else:
        doc["inputs"] = draw(json_values())
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.text(max_size=6)}, optional={"parameters": st.fixed_dictionaries(
                {}, optional={"binary_data": json_values(3)})}), max_size=2) | json_values())
    if draw(st.booleans()):
        doc["parameters"] = draw(parameters(pools))
    if draw(st.booleans()):
        doc["id"] = draw(json_values(3))
    if draw(st.integers(0, 5)) == 0:
        doc["raw_input_contents"] = draw(st.lists(
            st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode())
            | st.text(max_size=8), max_size=3))
    head = json.dumps(doc).encode()
    headers: dict[str, str] = {}
    body = head
    if binary:
        body = head + b"".join(binary)
        headers["Inference-Header-Content-Length"] = str(draw(
            st.sampled_from([len(head)]) | st.integers(-10, len(body) + 10)))
    elif draw(st.integers(0, 19)) == 0:
        headers["Inference-Header-Content-Length"] = draw(
            st.sampled_from(["abc", "-1", "99999999999999999999", "", "1.5", " 3"]))
    return body, headers


# -- one request ----------------------------------------------------------------------

@dataclass
class Case:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    good_credentials: bool
    deploys: str | None = None  # the model this case may create (removed after it)


@st.composite
def credentials(draw: Callable, access: str, tokens: dict[str, str], bucket_token: str
                ) -> tuple[dict[str, str], bool]:
    headers: dict[str, str] = {}
    good = draw(st.integers(0, 9)) > 0  # 90%: reach the handler
    if good:
        token = tokens[CONTROL] if draw(st.booleans()) else tokens.get(access, tokens[CONTROL])
        headers["Authorization"] = f"Bearer {token}"
    else:
        bad = draw(st.sampled_from(["missing", "wrong", "scheme", "other", "long", "many"]))
        if bad == "wrong":
            headers["Authorization"] = "Bearer " + draw(st.text(
                st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60))
        elif bad == "scheme":
            headers["Authorization"] = draw(st.sampled_from(
                ["Basic dXNlcjpwYXNz", "Bearer", "bearer", "Token x", "Bearer  ", "Digest a=b"]))
        elif bad == "other":
            other = [t for k, t in tokens.items() if k not in (access, CONTROL)]
            headers["Authorization"] = f"Bearer {draw(st.sampled_from(other))}"
        elif bad == "long":
            headers["Authorization"] = "Bearer " + "a" * draw(st.integers(4097, 20000))
        elif bad == "many":
            headers["X-Cachemesh-Bucket-Token"] = ",".join(["t"] * 20)
    if draw(st.booleans()):
        headers["X-Cachemesh-Bucket-Token"] = bucket_token
    good = good or access == OPEN or access not in tokens
    return headers, good


def encode_path(template: str, values: dict[str, str], raw: bool) -> str:
    path = template
    for name, value in values.items():
        # Raw: '%' and '/' as they are, so "%2e%2e" and "a/b" reach the router unencoded.
        encoded = quote(value, safe="%/" if raw else "")
        path = re.sub("{" + name + "(:[^}]*)?}", lambda _, e=encoded: e, path)
    return path


@st.composite
def cases(draw: Callable, ep: Endpoint, pools: Pools, tokens: dict[str, str],
          bucket_token: str) -> Case:
    destructive = ep.method == "DELETE" or ep.path.endswith("/unload")
    values = {p: draw(pools.names(destructive)) for p in ep.params}
    path = encode_path(ep.path, values, raw=draw(st.integers(0, 9)) == 0)
    if ep.query and draw(st.booleans()):
        query = {name: draw(schema_values(schema, {})) for name, schema in ep.query}
        path += "?" + "&".join(f"{quote(str(k))}={quote(str(v))}" for k, v in query.items())
    elif draw(st.integers(0, 9)) == 0:
        path += "?" + draw(st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                   max_size=20)).replace("#", "")
    headers, good = draw(credentials(ep.access, tokens, bucket_token))
    body = b""
    deploys = None
    overrides = {
        "name": st.sampled_from(pools.disposable) | pools.names(False),
        "source": st.sampled_from(pools.sources),
        "bucket": st.sampled_from(pools.buckets),
        "model": pools.names(False),
        "parameters": parameters(pools),
    }
    if ep.path.endswith("/infer"):
        if draw(st.integers(0, 7)):
            body, extra = draw(v2_request(pools))
            headers.update(extra)
        else:
            body = draw(garbage_body())
    elif ep.path.endswith("/load"):
        body = draw(st.one_of(repository_load(pools).map(lambda d: json.dumps(d).encode()),
                              garbage_body()))
        deploys = values.get("model")
    elif ep.path.endswith("/unload") or ep.path.endswith("/index"):
        body = draw(st.one_of(st.fixed_dictionaries({}, optional={
            "parameters": st.fixed_dictionaries({}, optional={"remove": json_values(3)}),
            "ready": json_values(3)}).map(lambda d: json.dumps(d).encode()), garbage_body(),
            st.just(b"")))
    elif ep.schema is not None:
        valid = schema_values(ep.schema, overrides)
        pick = draw(st.integers(0, 9))
        if pick < 5:
            body = json.dumps(draw(valid)).encode()
        elif pick < 8:
            body = json.dumps(draw(mutated(valid))).encode()
        else:
            body = draw(garbage_body())
        if ep.method == "POST":
            deploys = "from-response"
    elif draw(st.integers(0, 4)) == 0:
        body = draw(garbage_body())
    if body and draw(st.integers(0, 9)) == 0:
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "gzip, gzip", "x", "broken"]))
        if encoding == "gzip":
            body = gzip.compress(body)
        elif encoding == "deflate":
            body = zlib.compress(body)
        elif encoding == "broken":
            encoding, body = "gzip", gzip.compress(body)[:-5]
        headers["Content-Encoding"] = encoding
    if body:
        headers["Content-Type"] = "application/json" if draw(st.integers(0, 9)) else draw(
            st.sampled_from(["text/plain", "application/octet-stream", "multipart/form-data;"
                             " boundary=x", "application/json; charset=latin-1", "", "*/*"]))
    return Case(ep.method, path, headers, body, good, deploys)


def repository_load(pools: Pools) -> st.SearchStrategy[dict]:
    real = st.fixed_dictionaries({"source": st.just(pools.valid_source),
                                  "config": st.just(pools.valid_config),
                                  "runtime": st.just("custom")})
    other = st.fixed_dictionaries({}, optional={
        "source": st.sampled_from(pools.sources) | json_values(3),
        "runtime": st.sampled_from(["custom", "sklearn", "nope"]) | json_values(3),
        "version": json_values(3),
        "config": st.one_of(parameters(pools), st.text(max_size=30),
                            st.just('{"class": "toy:Echo"'), st.just("[1, 2]")),
    })
    return st.fixed_dictionaries({}, optional={"parameters": st.one_of(real, other,
                                                                          json_values())})


# -- running ---------------------------------------------------------------------------

@dataclass
class Outcome:
    sent: Counter = field(default_factory=Counter)  # endpoint id -> requests
    statuses: dict[str, Counter] = field(default_factory=dict)
    unsendable: Counter = field(default_factory=Counter)  # the client refused to send it
    seconds: Counter = field(default_factory=Counter)


class Runner:
    """Sends cases to a live server, checks the property, undoes deployments."""

    def __init__(self, url: str, cleanup_headers: dict[str, str], outcome: Outcome,
                 keep: set[str]) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        self.cleanup_headers = cleanup_headers
        self.outcome = outcome
        self.keep = keep  # models every case may address: never removed

    def close(self) -> None:
        self.client.close()

    def send(self, ep: Endpoint, case: Case) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = self.client.request(case.method, case.path, content=case.body or None,
                                    headers=case.headers)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
            self.outcome.unsendable[ep.id] += 1
            return None
        finally:
            self.outcome.seconds[ep.id] += time.perf_counter() - started
        self.outcome.sent[ep.id] += 1
        self.outcome.statuses.setdefault(ep.id, Counter())[r.status_code] += 1
        if r.status_code in (200, 201) and case.deploys:
            name = case.deploys
            if name == "from-response":
                try:
                    name = r.json().get("name")
                except (ValueError, AttributeError):
                    name = None
            if isinstance(name, str) and name not in self.keep:
                self.client.delete(f"/api/v1/models/{quote(name, safe='')}",
                                   headers=self.cleanup_headers)
        return r


def check(ep: Endpoint, case: Case, r: httpx.Response, secrets: tuple[str, ...]) -> None:
    """The property every answer has."""
    where = f"{case.method} {case.path} -> {r.status_code}: {r.text[:500]!r}"
    assert r.status_code < 500, where
    if case.good_credentials:
        assert r.status_code != 401, where
    assert b"Traceback" not in r.content, where
    for secret in secrets:
        assert secret not in r.text and secret not in str(r.headers), where
