"""KServe V2 (Open Inference Protocol) bodies <-> protocol-free messages.

Three request forms are read:

- JSON with ``data`` (flat or nested lists), the REST form of the spec;
- the binary tensor extension (what ``tritonclient.http`` sends): a JSON header
  of ``Inference-Header-Content-Length`` bytes, then each input whose
  parameters carry ``binary_data_size`` as raw little-endian bytes, in order
  (BYTES elements as a 4-byte length and the bytes);
- the gRPC message as JSON (``contents`` with ``fp32_contents`` or
  ``fp32Contents`` ..., ``raw_input_contents`` as base64), as clients of the
  ModelMesh REST proxy send it. Such a request gets its answer in the same
  form, as protobuf's JSON mapping writes it: camelCase names, 64-bit integers
  (shape included) as strings, bytes as base64.

Answers are JSON, or JSON plus binary outputs when the request asks for them
(``binary_data`` on a requested output, or ``binary_data_output`` on the
request). Everything wrong with a body is an
:class:`~cachemesh.errors.InferenceInputError` naming the input at fault.

The tensor-level functions are shared with the gRPC adapter (``v2_grpc.py``),
which reads protobuf messages instead of JSON: :func:`check_datatype`,
:func:`check_shape`, :func:`unwrap_parameters`, :func:`decode_raw`,
:func:`contents_field`, :func:`decode_contents` (request side) and :func:`encode_raw`,
:func:`contents_values`, :func:`needs_raw_outputs` (answer side).
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ...errors import InferenceInputError
from ...runtimes.types import (
    DATATYPES,
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
)
from ..core.jsonshape import check_json
from . import json_tensors
from .limits import (
    MAX_TENSOR_ELEMENTS,
    NUMERIC_COST,
    ParseBudget,
    check_shape,
    held,
    parse_cost,
    whole,
)

# gRPC InferTensorContents field for each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_CAMEL = {v: v.split("_")[0] + "Contents" for v in CONTENTS_FIELD.values()}
_INT_LIMITS = {dt: np.iinfo(dt) for name, dt in DATATYPES.items() if dt.kind in "iu"}
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(slots=True)
class Form:
    """How the request was written, so the answer is written the same way."""

    grpc_json: bool = False
    binary_all: bool = False  # binary_data_output on the request
    binary: frozenset[str] = frozenset()  # outputs asked for in binary
    not_binary: frozenset[str] = frozenset()


def _fail(msg: str) -> InferenceInputError:
    return InferenceInputError(msg)


def unwrap_parameters(params: Any, where: str) -> dict[str, Any]:
    """Plain V2 parameters, or gRPC InferParameter objects ({"bool_param": true})."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _fail(f"{where}: parameters must be an object")
    check_json(params, f"{where}: parameters")  # kept and passed on to the model (jsonshape.py)
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and len(value) == 1:
            (k, v), = value.items()
            if k in ("bool_param", "boolParam", "string_param", "stringParam", "double_param",
                     "doubleParam"):
                value = v
            elif k in ("int64_param", "int64Param", "uint64_param", "uint64Param"):
                try:
                    value = int(v)  # protobuf JSON writes 64-bit integers as strings
                except (TypeError, ValueError):  # found by the fuzzer: was a 500
                    raise _fail(f"{where}: parameter {key!r}: {k} {v!r} is not an integer"
                                ) from None
        out[key] = value
    return out


def _numeric(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    try:
        raw = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise _fail(f"{where}: data is not a regular array: {exc}") from None
    kind = raw.dtype.kind
    if raw.size == 0:
        raw = raw.astype(dtype)
    elif datatype == "BOOL":
        if kind != "b":
            raise _fail(f"{where}: BOOL data must be true/false, got {raw.dtype} values")
    elif dtype.kind in "iu":
        if kind not in "iub":
            # Values past int64 (UINT64's upper half) make numpy guess float or object.
            flat = _flatten(data)
            if not all(type(v) is int for v in flat):
                raise _fail(f"{where}: {datatype} data must be integers, got {_kind(kind)}")
            try:
                arr = np.array(flat, dtype=dtype)
            except OverflowError:
                raise _fail(f"{where}: a value is out of range for {datatype}") from None
            return _reshape(arr, shape, where)
        lim = _INT_LIMITS[dtype]
        # As Python ints: numpy refused to compare a bool array's min with 2**64 - 1
        # (OverflowError, a 500; found by the fuzzer).
        if kind != "b" and (int(raw.min()) < lim.min or int(raw.max()) > lim.max):
            raise _fail(f"{where}: a value is out of range for {datatype}")
    elif kind not in "iufb":
        raise _fail(f"{where}: {datatype} data must be numbers, got {_kind(kind)}")
    arr = raw.astype(dtype, copy=False)
    return _reshape(arr, shape, where)


def _kind(kind: str) -> str:
    return {"f": "floating-point values", "U": "strings", "O": "mixed values", "b": "booleans",
            "S": "strings"}.get(kind, f"values of kind {kind!r}")


def _reshape(arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    if arr.size != math.prod(shape):
        raise _fail(f"{where}: shape {list(shape)} needs {math.prod(shape)} values,"
                    f" data has {arr.size}")
    return arr.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _bytes_array(items: list[Any], shape: tuple[int, ...], where: str) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        if isinstance(v, str):
            arr[i] = v.encode()
        elif isinstance(v, bytes):
            arr[i] = v
        else:
            raise _fail(f"{where}: BYTES data must be strings, got {type(v).__name__}")
    return _reshape(arr, shape, where)


def decode_raw(buf: bytes | memoryview, datatype: str, shape: tuple[int, ...],
               where: str) -> np.ndarray:
    """A tensor from its little-endian bytes (BYTES: 4-byte length, bytes, ...)."""
    if datatype == "BYTES":
        items, pos, mv = [], 0, memoryview(buf)
        while pos < len(mv):
            if pos + 4 > len(mv):
                raise _fail(f"{where}: truncated BYTES element length")
            (n,) = struct.unpack_from("<I", mv, pos)
            pos += 4
            if pos + n > len(mv):
                raise _fail(f"{where}: truncated BYTES element")
            items.append(bytes(mv[pos:pos + n]))
            pos += n
        return _bytes_array(items, shape, where)
    dtype = DATATYPES[datatype].newbyteorder("<")
    if len(buf) % dtype.itemsize:
        raise _fail(f"{where}: {len(buf)} bytes is not a whole number of {datatype} values")
    arr = np.frombuffer(buf, dtype=dtype)
    if datatype == "BOOL":
        arr = arr.view(np.bool_)
    return _reshape(arr, shape, where)


def _contents(contents: Any, datatype: str, shape: tuple[int, ...], where: str,
              spans: dict[int, json_tensors.Span]) -> np.ndarray:
    """``contents`` of the gRPC message written as JSON."""
    if not isinstance(contents, dict):
        raise _fail(f"{where}: contents must be an object")
    field = contents_field(datatype, where)
    values = contents.get(field, contents.get(_CAMEL[field]))
    if type(values) is int and values in spans:
        return _from_span(spans.pop(values), datatype, shape, where)
    if values is None:
        present = ", ".join(contents) or "none"
        raise _fail(f"{where}: {datatype} data goes in contents.{field} (got {present})")
    if not isinstance(values, list):
        raise _fail(f"{where}: contents.{field} must be a list")
    if datatype == "BYTES":
        try:
            values = [base64.b64decode(v, validate=True) for v in values]
        except (ValueError, TypeError):
            raise _fail(f"{where}: bytes_contents must be base64 strings") from None
    elif values and isinstance(values[0], str) and DATATYPES[datatype].kind in "iu":
        try:
            values = [int(v) for v in values]  # protobuf JSON writes 64-bit integers as strings
        except ValueError:
            raise _fail(f"{where}: contents.{field} holds a value that is not an integer") from None
    return decode_contents(values, datatype, shape, where)


def contents_field(datatype: str, where: str) -> str:
    """The gRPC ``contents`` field that holds ``datatype`` (none for FP16: raw only)."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _fail(f"{where}: {datatype} has no contents field; send it in raw_input_contents")
    return field


def decode_contents(values: Any, datatype: str, shape: tuple[int, ...],
                    where: str) -> np.ndarray:
    """A tensor from the typed values of its ``contents`` field (a list, or a protobuf
    repeated field): range-checked for the narrower integer types, reshaped."""
    contents_field(datatype, where)
    if datatype == "BYTES":
        return _bytes_array(list(values), shape, where)
    return _numeric(list(values), datatype, shape, where)


def check_datatype(datatype: Any, where: str) -> str:
    """The V2 datatype named (case-insensitive), or an error listing the known ones."""
    if not isinstance(datatype, str) or datatype.upper() not in DATATYPES:
        raise _fail(f"{where}: unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
    return datatype.upper()


def _from_span(span: json_tensors.Span, datatype: str, shape: tuple[int, ...],
               where: str) -> np.ndarray:
    """A tensor from a numeric array that json_tensors cut out of the body."""
    if datatype in ("BYTES", "BOOL"):
        wanted = "strings" if datatype == "BYTES" else "true/false"
        raise _fail(f"{where}: {datatype} data must be {wanted}, got numbers")
    try:
        flat, _ = json_tensors.parse(span, DATATYPES[datatype])
    except json_tensors.NotIntegers:
        raise _fail(f"{where}: {datatype} data must be integers, got floating-point values"
                    ) from None
    except json_tensors.OutOfRange:
        raise _fail(f"{where}: a value is out of range for {datatype}") from None
    except json_tensors.BadSpan as exc:
        raise _fail(f"{where}: {exc}") from None
    return _reshape(flat, shape, where)


def parse_request(body: bytes, header_length: int | None = None,
                  max_elements: int = MAX_TENSOR_ELEMENTS, budget: ParseBudget | None = None
                  ) -> tuple[InferenceRequest, Form]:
    """Read a V2 inference request body (JSON, or JSON plus binary tensors); a tensor
    holds at most ``max_elements`` elements (the server's body limit). Long numeric
    arrays are read by json_tensors, not as one Python object per number. With a
    ``budget``, the parse holds an estimate of its memory in it (limits.py)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise _fail(f"Inference-Header-Content-Length {header_length} is outside the body"
                        f" ({len(body)} bytes)")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    large = len(head) >= json_tensors.MIN_SPAN
    with held(budget, NUMERIC_COST * len(head) if large else 0):
        skeleton, spans = json_tensors.split(head)
        if spans:
            with held(budget, parse_cost(skeleton)):
                try:
                    return _parse(skeleton, binary, max_elements, spans)
                except json_tensors.Fallback:
                    pass
    with held(budget, parse_cost(head)):
        return _parse(head, binary, max_elements, {})


def json_object(body: bytes | str) -> dict[str, Any]:
    """A request body that must be a JSON object, with the words every JSON route of the
    server uses for one that is not (V2 inference, the OpenAI routes)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _fail("the request body must be a JSON object")
    return doc


def _parse(head: bytes, binary: memoryview, max_elements: int,
           spans: dict[int, json_tensors.Span]) -> tuple[InferenceRequest, Form]:
    doc = json_object(head)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _fail("the request needs a non-empty list 'inputs'")
    raw_contents = doc.get("raw_input_contents", doc.get("rawInputContents"))
    grpc_json = raw_contents is not None or any(
        isinstance(i, dict) and "contents" in i for i in inputs)
    params = unwrap_parameters(doc.get("parameters"), "request")
    tensors: list[Tensor] = []
    offset = 0
    for index, item in enumerate(inputs):
        where = f"input #{index + 1}"
        if not isinstance(item, dict):
            raise _fail(f"{where} must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(f"{where} needs a 'name'")
        where = f"input {name!r}"
        datatype = check_datatype(item.get("datatype"), where)
        if type(item.get("shape")) is int and item["shape"] in spans:
            raise json_tensors.Fallback  # a shape that long is wrong: orjson will say how
        shape = check_shape(item.get("shape"), where, max_elements)
        tparams = unwrap_parameters(item.get("parameters"), where)
        given = tparams.pop("binary_data_size", None)
        if given is not None:
            size = whole(given)
            if size is None:
                raise _fail(f"{where}: binary_data_size {given!r} is not a non-negative integer")
            if offset + size > len(binary):
                raise _fail(f"{where}: binary_data_size is {size} bytes, but only"
                            f" {len(binary) - offset} bytes follow in the body; it runs past"
                            " the end of the body")
            array = decode_raw(binary[offset:offset + size], datatype, shape, where)
            offset += size
        elif "data" in item:
            data = item["data"]
            if type(data) is int and data in spans:
                array = _from_span(spans.pop(data), datatype, shape, where)
            elif datatype == "BYTES":
                array = _bytes_array(_flatten(data), shape, where)
            else:
                array = _numeric(data, datatype, shape, where)
        elif "contents" in item:
            array = _contents(item["contents"], datatype, shape, where, spans)
        elif isinstance(raw_contents, list) and index < len(raw_contents):
            try:
                buf = base64.b64decode(raw_contents[index], validate=True)
            except (ValueError, TypeError):
                raise _fail(f"{where}: raw_input_contents[{index}] is not base64") from None
            array = decode_raw(buf, datatype, shape, where)
        else:
            raise _fail(f"{where} has no data")
        tensors.append(Tensor(name, datatype, shape, array, tparams))
    if offset != len(binary):
        raise _fail(f"{len(binary) - offset} bytes after the last binary input")

    outputs = []
    binary_outs, plain_outs = set(), set()
    for index, item in enumerate(doc.get("outputs") or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail(f"output #{index + 1} needs a 'name'")
        oparams = unwrap_parameters(item.get("parameters"), f"output {item['name']!r}")
        flag = oparams.pop("binary_data", None)
        if flag is True:
            binary_outs.add(item["name"])
        elif flag is False:
            plain_outs.add(item["name"])
        outputs.append(RequestedOutput(item["name"], oparams))
    if spans:  # a placeholder that was not a tensor's values: read the body as it is
        raise json_tensors.Fallback
    binary_all = bool(params.pop("binary_data_output", False))
    rid = doc.get("id")
    request = InferenceRequest(tensors, outputs, params, None if rid is None else str(rid))
    return request, Form(grpc_json, binary_all, frozenset(binary_outs), frozenset(plain_outs))


def _json_data(t: Tensor) -> Any:
    data = t.data
    if t.datatype == "BYTES":
        return [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
                for v in data.reshape(-1)]
    flat = np.ascontiguousarray(data).reshape(-1)
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    return flat


def encode_raw(t: Tensor) -> bytes:
    """A tensor as little-endian bytes (the binary extension's and gRPC's raw form)."""
    if t.datatype == "BYTES":
        parts = []
        for v in t.data.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(t.data, dtype=t.data.dtype.newbyteorder("<")).tobytes()


def encode_response(response: InferenceResponse, form: Form) -> tuple[bytes, int | None]:
    """The body of the answer, and the JSON header's length when binary outputs follow."""
    if form.grpc_json:
        return _encode_grpc_json(response), None
    outputs, blobs = [], []
    for t in response.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = dict(t.parameters)
        if t.name in form.binary or (form.binary_all and t.name not in form.not_binary):
            raw = encode_raw(t)
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        else:
            out["data"] = _json_data(t)
        if params:
            out["parameters"] = params
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=_JSON_OPTS)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _grpc_param(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolParam": value}
    if isinstance(value, int):
        return {"int64Param": str(value)}
    if isinstance(value, float):
        return {"doubleParam": value}
    return {"stringParam": str(value)}


def needs_raw_outputs(response: InferenceResponse, raw_inputs: bool) -> bool:
    """Whether a gRPC answer carries its outputs in ``raw_output_contents``: when the
    request sent raw inputs (as Triton answers), and whenever an output has no
    contents field (FP16); the raw list goes by position, so then every output is raw."""
    return raw_inputs or any(t.datatype not in CONTENTS_FIELD for t in response.outputs)


def contents_values(t: Tensor) -> tuple[str, list[Any]]:
    """The ``contents`` field of an output and its values, flat (BYTES as bytes)."""
    flat = t.data.reshape(-1)
    if t.datatype == "BYTES":
        return "bytes_contents", [v if isinstance(v, bytes) else str(v).encode() for v in flat]
    return CONTENTS_FIELD[t.datatype], flat.tolist()


def _encode_grpc_json(response: InferenceResponse) -> bytes:
    outputs, raw = [], []
    use_raw = needs_raw_outputs(response, False)
    for t in response.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype,
                               "shape": [str(d) for d in t.shape]}
        if t.parameters:
            out["parameters"] = {k: _grpc_param(v) for k, v in t.parameters.items()}
        if use_raw:
            raw.append(base64.b64encode(encode_raw(t)).decode())
        else:
            field, values = contents_values(t)
            if t.datatype == "BYTES":
                values = [base64.b64encode(v).decode() for v in values]
            elif t.datatype in ("INT64", "UINT64"):
                values = [str(v) for v in values]
            out["contents"] = {_CAMEL[field]: values}
        outputs.append(out)
    doc: dict[str, Any] = {"modelName": response.model_name}
    if response.model_version:
        doc["modelVersion"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = {k: _grpc_param(v) for k, v in response.parameters.items()}
    doc["outputs"] = outputs
    if raw:
        doc["rawOutputContents"] = raw
    return orjson.dumps(doc)
