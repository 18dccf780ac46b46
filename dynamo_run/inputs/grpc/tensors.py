"""KServe v2 tensors <-> Python values, without numpy.

Inputs arrive either as ``raw_input_contents`` (what tritonclient sends: little-endian
elements, BYTES elements each prefixed by a 4-byte length) or as typed ``contents``; outputs
are written raw, as Triton itself does, which every KServe client reads.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from dynamo_run.inputs.grpc.proto import grpc_service_pb2 as pb

# struct formats of the fixed-size datatypes.
_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
# The InferTensorContents field that holds each datatype's typed elements.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
DATATYPES = (*_FORMATS, "BYTES")


class TensorError(ValueError):
    """A malformed or unacceptable input tensor (INVALID_ARGUMENT); ``name`` names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"input '{name}': {message}" if name else message)
        self.name = name


@dataclass(frozen=True)
class Tensor:
    """One decoded input: its elements flattened, as Python values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]


def _element_count(name: str, shape: tuple[int, ...]) -> int:
    if any(d < 0 for d in shape):
        raise TensorError(name, f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES elements of a raw tensor: each a 4-byte little-endian length, then the bytes."""
    values, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise TensorError(name, "raw BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise TensorError(name, "raw BYTES data ends inside an element")
        values.append(raw[pos : pos + size])
        pos += size
    return values


def _decode_raw(name: str, datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        return _split_bytes(name, raw)
    fmt = _FORMATS[datatype]
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise TensorError(name, f"{len(raw)} raw bytes are not whole {datatype} elements")
    return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Every input tensor of ``request`` by name; TensorError names the first bad one."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(
            "", f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; they must match"
        )
    tensors: dict[str, Tensor] = {}
    for index, spec in enumerate(request.inputs):
        name, datatype, shape = spec.name, spec.datatype.upper(), tuple(spec.shape)
        if name in tensors:
            raise TensorError(name, "given twice")
        if datatype not in DATATYPES:
            raise TensorError(name, f"datatype '{spec.datatype}' is not supported")
        count = _element_count(name, shape)
        if raw:
            values = _decode_raw(name, datatype, raw[index])
        elif datatype == "FP16":
            raise TensorError(name, "FP16 elements must be sent as raw_input_contents")
        else:
            values = list(getattr(spec.contents, _CONTENTS[datatype]))
        if len(values) != count:
            raise TensorError(
                name, f"shape {list(shape)} holds {count} elements but {len(values)} were sent"
            )
        tensors[name] = Tensor(name, datatype, shape, values)
    return tensors


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of a request parameter (None when unset)."""
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def set_parameter(params: Any, key: str, value: bool | int | float | str) -> None:
    """Store ``value`` in a protobuf map of InferParameter under ``key``."""
    param = params[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def bytes_raw(values: list[bytes]) -> bytes:
    """Raw form of a BYTES tensor."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def add_bytes_output(response: pb.ModelInferResponse, name: str, values: list[bytes]) -> None:
    out = response.outputs.add()
    out.name = name
    out.datatype = "BYTES"
    out.shape.append(len(values))
    response.raw_output_contents.append(bytes_raw(values))


def add_uint32_output(response: pb.ModelInferResponse, name: str, value: int) -> None:
    out = response.outputs.add()
    out.name = name
    out.datatype = "UINT32"
    out.shape.append(1)
    response.raw_output_contents.append(struct.pack("<I", value))
