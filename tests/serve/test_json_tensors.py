"""The numeric fast path of JSON bodies agrees with orjson + numpy, byte for byte.

``json_tensors`` reads long numeric arrays of a request without orjson; what it
accepts must be exactly what orjson accepts and mean the same numbers, and what
orjson refuses (or numpy finds ragged) it must refuse. Spans are made small here
so that hypothesis's short examples exercise the slicing and the structure checks.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cachemesh.errors import InferenceInputError
from cachemesh.serve.adapters import json_tensors as jt
from cachemesh.serve.adapters.v2_codec import parse_request


@pytest.fixture(autouse=True)
def tiny_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jt, "MIN_SPAN", 8)
    monkeypatch.setattr(jt, "_SLICE", 16)


def _reference(text: bytes, integers: bool):
    """What orjson then numpy make of ``text``: (flat values, shape), or None if refused."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    try:
        arr = np.asarray(value)
    except ValueError:
        return None  # ragged
    if arr.dtype == object or (arr.size and arr.dtype.kind not in "iuf"):
        return None
    if integers and arr.size and arr.dtype.kind == "f":
        return None
    return arr.reshape(-1).astype(np.int64 if integers else np.float64), arr.shape


def _ours(text: bytes, integers: bool):
    try:
        return jt.parse(jt.Span(memoryview(text)), np.dtype(np.int64 if integers else np.float64))
    except jt.BadSpan:
        return None
    except jt.Fallback:
        assume(False)  # integers past 10**18, numbers too long: orjson's, not compared here


numbers = st.one_of(st.integers(-10**17, 10**17),
                    st.floats(allow_nan=False, allow_infinity=False))
nested = st.recursive(st.lists(numbers, max_size=4),
                      lambda inner: st.lists(inner, min_size=1, max_size=3), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(nested, st.booleans(), st.sampled_from([b"", b" ", b"\n "]))
def test_any_nested_array_reads_as_orjson_and_numpy_read_it(value, integers, blank):
    text = orjson.dumps(value)
    if blank:
        text = text.replace(b",", b"," + blank).replace(b"[", b"[" + blank)
    expected, ours = _reference(text, integers), _ours(text, integers)
    if expected is None:
        assert ours is None, text
    else:
        assert ours is not None, text
        assert ours[1] == expected[1]
        assert ours[0].tolist() == expected[0].tolist(), text


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet="[]0123456789,.-+eE ", min_size=1, max_size=24), st.booleans())
def test_any_text_of_those_characters_is_refused_unless_orjson_takes_it(text, integers):
    raw = ("[" + text + "]").encode()
    expected, ours = _reference(raw, integers), _ours(raw, integers)
    if expected is None:
        assert ours is None, raw
    else:
        assert ours is not None and ours[1] == expected[1], raw
        assert ours[0].tolist() == expected[0].tolist(), raw


def _body(data: bytes, **item) -> bytes:
    head = orjson.dumps({"name": "t", "shape": [4], "datatype": "FP32", **item})
    return b'{"inputs":[' + head[:-1] + b',"data":' + data + b"}]}"


def test_requests_take_the_fast_path_and_mean_what_orjson_means():
    req, _ = parse_request(_body(b"[[1, 2], [3, 4.5]]"))
    assert req.inputs[0].data.tolist() == [1, 2, 3, 4.5]
    req, _ = parse_request(_body(b"[1, 2, 3, 4]", datatype="INT16"))
    assert req.inputs[0].data.dtype == np.int16
    with pytest.raises(InferenceInputError, match="out of range for UINT8"):
        parse_request(_body(b"[1, 2, 3, 256]", datatype="UINT8"))
    with pytest.raises(InferenceInputError, match="must be integers"):
        parse_request(_body(b"[1, 2, 3, 4.0]", datatype="INT32"))
    with pytest.raises(InferenceInputError, match="regular"):
        parse_request(_body(b"[[1, 2], [3, 4, 5]]", shape=[5]))
    with pytest.raises(InferenceInputError, match="BYTES data must be strings"):
        parse_request(_body(b"[1, 2, 3, 4]", datatype="BYTES"))
    # A numeric run inside a string or a parameter is left to orjson: the same meaning.
    body = orjson.dumps({"inputs": [{"name": "t", "shape": [2], "datatype": "FP32",
                                     "data": [1, 2], "parameters": {"p": [[5, 6], [7, 8]]}}],
                         "id": "[1, 2, 3, 4, 5]"})
    req, _ = parse_request(body)
    assert req.id == "[1, 2, 3, 4, 5]" and req.inputs[0].parameters == {"p": [[5, 6], [7, 8]]}
    # UINT64's upper half is read by orjson, exactly.
    req, _ = parse_request(_body(b"[18446744073709551615, 0, 1, 2]", datatype="UINT64"))
    assert req.inputs[0].data.tolist() == [2**64 - 1, 0, 1, 2]
    # gRPC-JSON contents too.
    body = orjson.dumps({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "FP64",
                                     "contents": {"fp64Contents": [0.5, 1, 2, 3]}}]})
    req, form = parse_request(body)
    assert form.grpc_json and req.inputs[0].data.tolist() == [[0.5, 1], [2, 3]]
