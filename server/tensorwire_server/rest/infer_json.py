"""An inference request's REST body as the protocol's ModelInferRequest: the JSON
object (all of the body, or its first Inference-Header-Content-Length bytes), each
input's binary data a view of the rest of the body (Triton's binary tensor data
extension: no copy), and JSON ``data`` made an array of the input's datatype.

Every number the body declares (lengths, sizes, shapes) is checked against the body
itself and the server's limits before anything is made from it; the model's checks
(datatypes, shapes against bytes, limits, shared memory) are ``kserve.codec``'s, the
same as over gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from tensorwire.errors import InvalidArgumentError, shown
from tensorwire.wire.dtypes import NUMPY_BY_WIRE
from tensorwire_server.kserve import codec
from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb
from tensorwire_server.limits import Limits
from tensorwire_server.rest.body import BodyError

#: The largest value a shape's dimension or a size may have (protobuf's int64).
_INT64: Final = 2**63 - 1
#: Datatypes whose elements JSON cannot carry exactly: binary data only.
BINARY_ONLY: Final = frozenset({"FP16", "BF16"})
#: What kind of JSON numbers each kind of datatype takes (NumPy's kind letters of the
#: array NumPy makes of them): integers for integers, any number for floats.
_KINDS: Final = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass(frozen=True)
class Parsed:
    """A REST inference request: the protocol's request (raw contents as views), and
    how each output is wanted back (True: binary data) and how the timeout it gives
    (seconds; None: none) bounds it."""

    request: codec.InferRequest
    binary: Mapping[str, bool]
    binary_default: bool
    timeout: float | None = None


def parse(
    body: memoryview,
    json_length: str | None,
    model: str,
    version: str,
    limits: Limits,
    json_limit: int,
) -> Parsed:
    """The request ``body`` makes for ``model`` (and ``version``), its JSON no more
    than ``json_limit`` bytes (413 past it); INVALID_ARGUMENT naming
    what is wrong."""
    size = body.nbytes
    if json_length is None:
        json_part, binary = body, body[:0]
    else:
        length = header_length(json_length, size)
        json_part, binary = body[:length], body[length:]
    json_within(json_part.nbytes, json_limit)
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"the request's JSON is malformed: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("the request's JSON must be an object with 'inputs'")
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("'id' must be a string")
    message.id = request_id
    parameters = _object(document.get("parameters"), "the request's 'parameters'")
    binary_default = _flag(parameters, "binary_data_output", "the request")
    timeout = _timeout(parameters)
    _parameters(message.parameters, parameters, ("binary_data_output", "timeout"), "the request")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgumentError("the request's JSON needs 'inputs', a list")
    limits.tensor_count(len(inputs))
    raw: list[memoryview] = []
    used = 0
    for i, entry in enumerate(inputs):
        used = _input(message, entry, i, binary, used, raw)
    if used != binary.nbytes:
        raise InvalidArgumentError(
            f"the body holds {binary.nbytes} bytes of binary data after its JSON, but the "
            f"inputs' binary_data_size add up to {used}"
        )
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgumentError("'outputs' must be a list")
    limits.tensor_count(len(inputs) + len(outputs))
    wanted: dict[str, bool] = {}
    for i, entry in enumerate(outputs):
        name, flag = _output(message, entry, i, binary_default)
        wanted[name] = flag
    return Parsed(codec.InferRequest(message, raw), wanted, binary_default, timeout)


def json_within(size: int, json_limit: int) -> None:
    """413 for ``size`` bytes of a request's JSON past ``json_limit``: checked from
    the request's headers before its body is read, and from the body itself."""
    if size > json_limit:
        raise BodyError(
            f"the request's JSON is {size} bytes, more than the {json_limit} "
            "this server parses (http_json_bytes); send tensors as binary data",
            413,
        )


def header_length(text: str, size: int) -> int:
    """Inference-Header-Content-Length ``text`` as a length within ``size`` bytes of
    body; INVALID_ARGUMENT naming what is wrong."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise InvalidArgumentError(
            f"Inference-Header-Content-Length {text[:40]!r} is not a length in bytes"
        )
    length = int(text)
    if length > size:
        raise InvalidArgumentError(
            f"Inference-Header-Content-Length is {length}, past the end of the {size}-byte body"
        )
    return length


def _input(
    message: pb.ModelInferRequest,
    entry: Any,
    index: int,
    binary: memoryview,
    used: int,
    raw: list[memoryview],
) -> int:
    """Add input ``entry`` to ``message`` and its contents to ``raw``: the binary data
    it takes from ``binary`` at ``used`` (returned past it), or its JSON data."""
    if not isinstance(entry, dict):
        raise InvalidArgumentError(f"inputs[{index}] must be an object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise InvalidArgumentError(f"inputs[{index}] needs a 'name', a string")
    what = f"input {shown(name)}"
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgumentError(f"{what} needs a 'datatype', a string")
    shape = _shape(entry.get("shape"), what)
    tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters = _object(entry.get("parameters"), f"{what}'s 'parameters'")
    _parameters(tensor.parameters, parameters, ("binary_data_size",), what)
    data = entry.get("data")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not _is_int(size) or size < 0:
            raise InvalidArgumentError(f"{what}: binary_data_size must be a whole number of bytes")
        if data is not None:
            raise InvalidArgumentError(f"{what} has both binary data and JSON 'data'")
        if used + size > binary.nbytes:
            raise InvalidArgumentError(
                f"{what}: binary_data_size {size} runs past the end of the body (its binary "
                f"data holds {binary.nbytes - used} more bytes)"
            )
        raw.append(binary[used : used + size])
        return used + int(size)
    if "shared_memory_region" in parameters:
        if data is not None:
            raise InvalidArgumentError(f"{what} has JSON 'data' and lies in shared memory")
        return used
    if data is None:
        raise InvalidArgumentError(
            f"{what} has no data: give 'data', or binary data with binary_data_size"
        )
    arr = _from_json(data, datatype, shape, what)
    raw.append(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    return used


def _from_json(data: Any, datatype: str, shape: list[int], what: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as an array of ``datatype``, its
    values checked to be numbers of the datatype's kind and to fit it."""
    if datatype in BINARY_ONLY:
        raise InvalidArgumentError(
            f"{what}: {datatype} cannot travel as JSON numbers; send it as binary data "
            "(binary_data_size)"
        )
    target = NUMPY_BY_WIRE[codec.wire_dtype(datatype, what)]
    if not isinstance(data, list):
        raise InvalidArgumentError(f"{what}: 'data' must be a list")
    try:
        found = np.array(data)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"{what}: 'data' is not a list of numbers: {exc}") from None
    if found.dtype.kind in "fO" and np.dtype(target).kind == "u":
        found = _unsigned(data, found, what)
    count = 1
    for dim in shape:
        count *= dim
    if found.size != count:
        raise InvalidArgumentError(
            f"{what}: 'data' holds {found.size} elements but {datatype} {shape} needs {count}"
        )
    kind = np.dtype(target).kind
    if found.size and found.dtype.kind not in _KINDS[kind]:
        raise InvalidArgumentError(
            f"{what}: 'data' holds {_kind_name(found.dtype.kind)}, not what {datatype} takes"
        )
    if kind in "iu" and found.size:
        info = np.iinfo(target)
        low, high = found.min(), found.max()
        if low < info.min or high > info.max:
            raise InvalidArgumentError(
                f"{what}: 'data' holds {low if low < info.min else high}, outside the range "
                f"of {datatype}"
            )
    return np.ascontiguousarray(found, dtype=target)


def _unsigned(data: list[Any], found: np.ndarray, what: str) -> np.ndarray:
    """Whole numbers past int64's range (NumPy makes floats or objects of a list that
    mixes them with others) as uint64, where every one of them is a whole number."""
    values = np.array(data, dtype=object).reshape(-1)
    if not all(type(v) is int and 0 <= v < 2**64 for v in values):
        return found  # refused below, as what it holds
    return np.array(values.tolist(), dtype=np.uint64)


def _kind_name(kind: str) -> str:
    return {"b": "booleans", "f": "fractions", "U": "strings", "O": "mixed values"}.get(
        kind, "numbers"
    )


def _output(
    message: pb.ModelInferRequest, entry: Any, index: int, default: bool
) -> tuple[str, bool]:
    if not isinstance(entry, dict):
        raise InvalidArgumentError(f"outputs[{index}] must be an object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise InvalidArgumentError(f"outputs[{index}] needs a 'name', a string")
    what = f"requested output {shown(name)}"
    parameters = _object(entry.get("parameters"), f"{what}'s 'parameters'")
    flag = _flag(parameters, "binary_data", what, default)
    tensor = message.outputs.add(name=name)
    _parameters(tensor.parameters, parameters, ("binary_data",), what)
    return name, flag


def _shape(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(d) for d in value):
        raise InvalidArgumentError(f"{what} needs a 'shape', a list of whole numbers")
    if any(d < 0 or d > _INT64 for d in value):
        raise InvalidArgumentError(
            f"{what}: shape {value[:8]} has a negative or too large dimension"
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{what} must be an object")
    return value


def _flag(parameters: Mapping[str, Any], key: str, what: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{what}: parameter {key} must be true or false")
    return value


def _timeout(parameters: Mapping[str, Any]) -> float | None:
    """Triton's ``timeout`` parameter, in microseconds, as seconds."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise InvalidArgumentError("parameter timeout must be a whole number of microseconds")
    return float(value) / 1e6


def _parameters(into: Any, parameters: Mapping[str, Any], skip: tuple[str, ...], what: str) -> None:
    """The JSON parameters as the protocol's InferParameters (bool, int64, double or
    string), leaving out those the REST layer itself reads (``skip``)."""
    for key, value in parameters.items():
        if key in skip:
            continue
        parameter = into[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            if not -_INT64 - 1 <= value <= _INT64:
                raise InvalidArgumentError(f"{what}: parameter {shown(key)} is out of range")
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InvalidArgumentError(
                f"{what}: parameter {shown(key)} must be a boolean, a number or a string"
            )
