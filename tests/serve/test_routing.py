"""Model documents and the routing decision (pure): validation, routes, weights."""

from __future__ import annotations

import math

import pytest

from cachemesh.errors import InvalidInputError, ModelNotFoundError
from cachemesh.serve.core.documents import ModelDoc, cache_name, doc_from_spec, make_document
from cachemesh.serve.core.registry import ModelSpec, parse_model_option, read_config
from cachemesh.serve.core.routing import Router

V = {"v1": {"source": "/m/1", "runtime": "sklearn"}, "v2": {"source": "/m/2"}}


def doc(**fields) -> ModelDoc:
    return make_document({"versions": V, "traffic": {"v1": 90, "v2": 10}, **fields}, "m")


def test_the_issue_shape_validates_and_round_trips_through_get_fields():
    d = doc(routes=[{"header": "x-model-version", "value": "v2", "version": "v2"}])
    assert d.name == "m" and d.traffic == {"v1": 90, "v2": 10}
    assert d.serving() == ["v1", "v2"] and d.primary() == "v1"
    # what GET adds (status) is dropped by PUT, so GET | edit | PUT works
    got = {**d.to_json(), "state": "Ready", "worker": 1, "rollout": "x",
           "versions": {k: {**v, "status": {"state": "Ready"}} for k, v in d.to_json()["versions"].items()}}
    assert make_document(got, "m") == d


@pytest.mark.parametrize("fields, fragment", [
    ({"traffic": {"v1": 90, "v2": 20}}, "sum to 110, not 100"),
    ({"traffic": {"v1": 90, "v3": 10}}, "unknown version(s) v3"),
    ({"traffic": {"v1": 90.5, "v2": 9.5}}, "traffic.v1"),
    ({"traffic": {"v1": 110, "v2": -10}}, "less than or equal to 100"),
    ({"traffic": {}}, "required when there are several versions"),
    ({"routes": [{"header": "x-v", "value": "b", "version": "v9"}]}, "routes.0: unknown version 'v9'"),
    ({"routes": [{"header": "x-v", "version": "v2"}]}, "exactly one of 'value', 'prefix'"),
    ({"routes": [{"header": "x v", "value": "1", "version": "v2"}]}, "is not a header name"),
    ({"routes": [{"header": "x", "parameter": "y", "value": "1", "version": "v2"}]},
     "exactly one of 'header' or 'parameter'"),
    ({"routes": [{"header": "x", "pattern": "(", "version": "v2"}]}, "pattern '('"),
    ({"aliases": {"v1": "v2"}}, "'v1' is a version label already"),
    ({"aliases": {"stable": "v7"}}, "points to unknown version 'v7'"),
    ({"versions": {"v 1": {"source": "/x"}}, "traffic": {"v 1": 100}}, "invalid version 'v 1'"),
    ({"versions": {"v1": {"source": " "}}, "traffic": {"v1": 100}}, "a source is required"),
    ({"versions": {"v1": {"source": "/x", "colour": "red"}}, "traffic": {"v1": 100}}, "colour"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_documents_say_what_is_wrong(fields, fragment):
    with pytest.raises(InvalidInputError) as err:
        doc(**fields)
    assert fragment in str(err.value)


def test_the_simple_forms_are_one_version_documents():
    d = make_document({"source": "/x", "runtime": "sklearn"}, "m")
    assert d.versions["default"].source == "/x" and d.traffic == {"default": 100}
    d = doc_from_spec(parse_model_option("m=/x,version=3,eager=true,class=a:B"))
    assert list(d.versions) == ["3"] and d.eager and d.versions["3"].parameters == {"class": "a:B"}
    assert make_document({"versions": {"a": {"source": "/x"}}}, "m").traffic == {"a": 100}
    d = doc_from_spec(parse_model_option("m=/x,copy_rate=10,max_copies=2,cooldown_s=5,k=v"))
    assert (d.scaling.copy_rate, d.scaling.max_copies, d.scaling.cooldown_s) == (10, 2, 5)
    assert d.versions["default"].parameters == {"k": "v"}
    with pytest.raises(InvalidInputError, match="max_copies"):
        parse_model_option("m=/x,max_copies=0")
    with pytest.raises(InvalidInputError, match="URL names 'm'"):
        make_document({"name": "other", "source": "/x"}, "m")
    with pytest.raises(InvalidInputError):
        doc_from_spec(ModelSpec(name="m", source="/x", version="bad label"))
    assert (cache_name("m", "default"), cache_name("m", "v2")) == ("m", "m.v2")


def test_config_files_take_documents_and_specs(tmp_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  - {name: a, source: /a}\n"
                   "  - name: b\n    versions: {v1: {source: /b1}, v2: {source: /b2}}\n"
                   "    traffic: {v1: 50, v2: 50}\n")
    a, b = read_config(cfg)
    assert a.source == "/a" and list(doc_from_spec(a).versions) == ["default"]
    assert b.traffic == {"v1": 50, "v2": 50}


def test_path_then_routes_then_traffic():
    d = doc(aliases={"canary": "v2"}, routes=[
        {"header": "x-model-version", "value": "v2", "version": "v2"},
        {"header": "x-user", "pattern": "beta-.*", "version": "canary"},
        {"header": "x-team", "prefix": "ml", "version": "v2"},
        {"parameter": "variant", "value": "b", "version": "v2"},
        {"parameter": "shard", "value": "3", "version": "v2"},
        {"parameter": "gold", "value": True, "version": "v2"}])
    always_v1 = Router(d, draw=lambda: 0.0)
    assert always_v1.choose().version == "v1"
    assert always_v1.choose("canary").version == "v2"  # an alias in the path
    assert always_v1.choose("v1", {"x-model-version": "v2"}).reason == "path"
    with pytest.raises(ModelNotFoundError):
        always_v1.choose("v3")
    cases = [({"x-model-version": "v2"}, None, "route 0: header x-model-version=v2"),
             ({"x-user": "beta-42"}, None, "route 1"),
             ({"x-team": "ml-infra"}, None, "route 2"),
             (None, {"variant": "b"}, "route 3: parameter variant=b"),
             (None, {"shard": 3}, "route 4"),  # 3 matches "3"
             (None, {"gold": True}, "route 5")]
    for headers, params, why in cases:
        got = always_v1.choose(None, headers, params)
        assert got.version == "v2" and got.reason.startswith(why), (headers, params, got)
    for headers, params in [({"x-user": "alpha-beta-1"}, None), ({"x-model-version": "v3"}, None),
                            (None, {"variant": "B"}), (None, {"gold": 1}), (None, {"shard": [3]})]:
        assert always_v1.choose(None, headers, params).version == "v1", (headers, params)
    assert Router(d, draw=lambda: 0.95).choose().reason == "traffic 10%"
    assert Router(d, draw=lambda: 0.8999).choose().version == "v1"
    assert Router(d, draw=lambda: 0.9).choose().version == "v2"


def test_weights_over_many_draws_fit_a_binomial_bound():
    router = Router(doc())  # the real random draw
    n = 20_000
    hits = sum(router.choose().version == "v2" for _ in range(n))
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(hits - n * 0.1) < 5.3 * sd  # fails by chance with probability < 1e-7


def test_one_version_and_no_routes_is_decided_without_drawing():
    router = Router(make_document({"source": "/x"}, "m"), draw=lambda: 1 / 0)
    assert router.choose().version == "default"
