"""An ONNX graph's inputs and outputs, read from the file without loading the model.

V2 model metadata must be there before the first load (a client reads it to build
its request). onnxruntime would copy every weight into its arena to say what
the graph takes, and even ``onnx.load`` parses every initializer; this reads
the protobuf wire format itself and seeks past everything but the graph's
``input``, ``output`` and the names of its initializers, so a 2 GB model costs a
few small reads. The message and field numbers are onnx.proto's::

    ModelProto        graph = 7
    GraphProto        initializer = 5 (TensorProto), input = 11, output = 12 (ValueInfoProto),
                      sparse_initializer = 15 (SparseTensorProto: values = 1)
    TensorProto       name = 8
    ValueInfoProto    name = 1, type = 2
    TypeProto         tensor_type = 1 (elem_type = 1, shape = 2)
    TensorShapeProto  dim = 1 (dim_value = 1, dim_param = 2)

Inputs that an initializer feeds are not inputs a request gives (onnxruntime leaves
them out of ``get_inputs`` too). The result has the form ``OnnxRuntime.metadata``
gives once loaded; None when the file cannot be read this way (the load will say why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

# onnx.proto's TensorProto.DataType -> KServe V2 datatypes (what onnxruntime maps).
ELEM_TO_V2 = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32",
              7: "INT64", 8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32",
              13: "UINT64"}
PLATFORM = "onnxruntime_onnx"


class _Malformed(Exception):
    pass


def _varint(read: Any) -> int | None:
    """A varint from ``read(1)``; None at the end."""
    shift = value = 0
    while True:
        b = read(1)
        if not b:
            if shift:
                raise _Malformed("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 70:
            raise _Malformed("varint too long")


def _file_fields(f: BinaryIO, end: int | None) -> Any:
    """(field, wire type, value) of a message in ``f`` up to ``end``: a length-delimited
    field gives (offset, length) and is skipped, the reader decides what to read."""
    while end is None or f.tell() < end:
        tag = _varint(f.read)
        if tag is None:
            return
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            yield field, wire, _varint(f.read)
        elif wire == 2:
            length = _varint(f.read)
            if length is None:
                raise _Malformed("truncated length")
            start = f.tell()
            yield field, wire, (start, length)
            f.seek(start + length)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        else:
            raise _Malformed(f"wire type {wire}")


def _fields(buf: bytes) -> Any:
    """(field, wire type, value) of a message held in memory (bytes for wire type 2)."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = buf[pos:pos + n]
        pos += len(out)
        return out

    while pos < len(buf):
        tag = _varint(read)
        if tag is None:
            return
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            yield field, wire, _varint(read)
        elif wire == 2:
            length = _varint(read) or 0
            if pos + length > len(buf):
                raise _Malformed("truncated field")
            yield field, wire, read(length)
        elif wire in (1, 5):
            read(8 if wire == 1 else 4)
        else:
            raise _Malformed(f"wire type {wire}")


def _read(f: BinaryIO, span: tuple[int, int]) -> bytes:
    f.seek(span[0])
    data = f.read(span[1])
    if len(data) != span[1]:
        raise _Malformed("truncated message")
    return data


def _tensor_name(f: BinaryIO, span: tuple[int, int]) -> str | None:
    f.seek(span[0])
    for field, wire, value in _file_fields(f, span[0] + span[1]):
        if field == 8 and wire == 2:
            return _read(f, value).decode("utf-8", "replace")
    return None


def _value_info(buf: bytes) -> dict[str, Any]:
    """A ValueInfoProto as {"name", "datatype" (None: not a tensor V2 carries), "shape"}."""
    name, datatype, shape = "", None, []
    for field, wire, value in _fields(buf):
        if field == 1 and wire == 2:
            name = value.decode("utf-8", "replace")
        elif field == 2 and wire == 2:
            for tfield, twire, tvalue in _fields(value):
                if tfield == 1 and twire == 2:  # a tensor (other fields: sequence, map...)
                    datatype, shape = _tensor_type(tvalue)
    return {"name": name, "datatype": datatype, "shape": shape}


def _tensor_type(buf: bytes) -> tuple[str | None, list[int]]:
    datatype, shape = None, []
    for field, wire, value in _fields(buf):
        if field == 1 and wire == 0:
            datatype = ELEM_TO_V2.get(value)
        elif field == 2 and wire == 2:
            for dfield, dwire, dim in _fields(value):
                if dfield == 1 and dwire == 2:
                    shape.append(_dim(dim))
    return datatype, shape


def _dim(buf: bytes) -> int:
    for field, wire, value in _fields(buf):
        if field == 1 and wire == 0:
            value -= (1 << 64) if value >= 1 << 63 else 0  # int64, two's complement
            return value if value >= 0 else -1
    return -1  # a named (dim_param) or unknown dimension


def read_signature(file: Path) -> dict[str, Any] | None:
    """V2 metadata of the ONNX model in ``file`` (see the module docstring), or None."""
    try:
        with open(file, "rb") as f:
            graph = next((v for field, wire, v in _file_fields(f, None)
                          if field == 7 and wire == 2), None)
            if graph is None or graph[0] + graph[1] > file.stat().st_size:
                return None  # no graph, or a file cut short
            inputs, outputs, fed = [], [], set()
            f.seek(graph[0])
            for field, wire, value in _file_fields(f, graph[0] + graph[1]):
                if wire != 2:
                    continue
                here = f.tell()
                if field in (11, 12):
                    (inputs if field == 11 else outputs).append(_value_info(_read(f, value)))
                elif field == 5:
                    fed.add(_tensor_name(f, value))
                elif field == 15:
                    f.seek(value[0])
                    for sfield, swire, svalue in _file_fields(f, value[0] + value[1]):
                        if sfield == 1 and swire == 2:
                            fed.add(_tensor_name(f, svalue))
                            break
                f.seek(here)
    except (OSError, _Malformed, UnicodeError):
        return None
    inputs = [i for i in inputs if i["name"] not in fed]
    if not inputs or any(i["datatype"] is None for i in inputs):
        return None  # the load refuses it, and says why
    tensors = [o for o in outputs if o["datatype"]]
    if not tensors:
        return None
    return {"platform": PLATFORM, "inputs": inputs, "outputs": tensors}
