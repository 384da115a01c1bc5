"""The v2 protocol's tensors <-> NumPy arrays: datatypes, raw and typed contents,
tensors placed in shared memory, the parameters of an inference request, and the
framing that keeps raw contents out of protobuf's copies.

Raw contents are the protocol's bulk payload: ``raw_input_contents`` (field 7 of
ModelInferRequest) and ``raw_output_contents`` (field 6 of ModelInferResponse) are
top-level repeated ``bytes``. A request's entries are cut out of the received bytes as
views before protobuf parses the rest (no copy); a response's are written after the
serialized rest, which protobuf readers merge into the same repeated field, so each
output byte is copied once, into the message gRPC sends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    TensorwireError,
    listed,
    shown,
)
from tensorwire.v1 import tensorwire_pb2 as twpb
from tensorwire.wire import framing
from tensorwire.wire.codec import as_wire_array, decode_array, layout
from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME
from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb
from tensorwire_server.limits import Limits
from tensorwire_server.named import Named
from tensorwire_server.regions.table import Placement

M = TypeVar("M", bound=Message)
#: Reads the tensor a placement in the caller's shared memory holds, as the Tensor
#: describes it (what: for errors): an array, or a device tensor from CUDA memory.
Read = Callable[[Placement, twpb.Tensor, str], Any]
#: Writes bytes at a placement in the caller's shared memory.
Write = Callable[[Placement, memoryview, str], None]

#: Every datatype tensorwire takes, by its v2 name, with tensorwire's name for it.
DATATYPES: Final[Mapping[str, str]] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
#: The v2 datatype of each tensorwire dtype name the protocol can carry.
DATATYPE_OF: Final[Mapping[str, str]] = {name: v2 for v2, name in DATATYPES.items()}
# The wire DType of each datatype: tensorwire's table gives its NumPy dtype and checks.
_WIRE: Final[Mapping[str, int]] = {v2: WIRE_BY_NAME[name] for v2, name in DATATYPES.items()}
# The InferTensorContents field holding each datatype's typed elements, and the dtype
# protobuf gives them in. FP16 and BF16 have none: they travel raw.
_TYPED: Final[Mapping[str, tuple[str, np.dtype[Any]]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}
_RAW_INPUTS: Final = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_RAW_OUTPUTS: Final = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
_STREAM_RESPONSE: Final = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name[
    "infer_response"
].number
_REGION: Final = "shared_memory_region"
_BYTE_SIZE: Final = "shared_memory_byte_size"
_OFFSET: Final = "shared_memory_offset"


def wire_dtype(datatype: str, what: str) -> int:
    """The tensorwire wire DType of a v2 ``datatype``; INVALID_ARGUMENT naming ``what``
    for BYTES and anything else the server cannot take."""
    wire = _WIRE.get(datatype)
    if wire is not None:
        return wire
    if datatype == "BYTES":
        raise InvalidArgumentError(
            f"{what}: datatype BYTES is not supported: tensorwire models take numeric "
            "tensors; send numbers, or encode strings as UINT8"
        )
    raise InvalidArgumentError(
        f"{what}: unknown datatype {shown(datatype)}; supported: {', '.join(DATATYPES)}"
    )


def datatype_of(arr: np.ndarray | Written, what: str) -> str:
    """The v2 datatype of an output array; FAILED_PRECONDITION for one the protocol has
    no datatype for (complex)."""
    datatype = DATATYPE_OF.get(arr.dtype.name)
    if datatype is None:
        raise FailedPreconditionError(
            f"{what} has dtype {arr.dtype.name}, which the v2 protocol has no datatype for; "
            "tensorwire.v1 carries it"
        )
    return datatype


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class InferRequest:
    """A received ModelInferRequest, its raw input contents kept aside as views of the
    received bytes."""

    message: pb.ModelInferRequest
    raw: list[memoryview] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        """The raw contents' bytes (typed contents, parsed by protobuf, are not counted)."""
        return sum(r.nbytes for r in self.raw)

    @property
    def shared(self) -> bool:
        """Whether any input or requested output lies in shared memory."""
        message = self.message
        return any(_REGION in t.parameters for t in message.inputs) or any(
            _REGION in t.parameters for t in message.outputs
        )


def receive_infer(data: bytes) -> InferRequest | TensorwireError:
    """A gRPC deserializer for ModelInferRequest that keeps raw contents as views and
    returns a malformed message's error instead of raising (gRPC would answer an
    exception here with an opaque status, and end a stream)."""
    try:
        view = memoryview(data)
        kept: list[memoryview] = []
        raw: list[memoryview] = []
        run = 0  # where the current stretch of kept fields began
        for number, wire_type, start, body, end in framing.fields(view, 0, view.nbytes):
            if number == _RAW_INPUTS and wire_type == 2:
                kept.append(view[run:start])
                raw.append(view[body:end])
                run = end
        kept.append(view[run:])
        small = b"".join(kept) if raw else data
        return InferRequest(pb.ModelInferRequest.FromString(small), raw)
    except DecodeError as exc:
        return InvalidArgumentError(f"malformed ModelInferRequest: {exc}")
    except TensorwireError as exc:
        return exc


def inputs(request: InferRequest, limits: Limits, read: Read) -> Named[np.ndarray]:
    """The request's inputs as arrays (raw ones are read-only views of the request,
    those in shared memory what ``read`` makes of them), after checking datatypes,
    shapes, byte lengths, placements, limits and parameters, in that order."""
    message = request.message
    limits.tensor_count(len(message.inputs))
    raw = request.raw
    checked = []
    shared = 0  # bytes read from shared memory, counted against max_request_bytes
    for tensor in message.inputs:
        what = f"input {shown(tensor.name)}"
        place = placement(tensor.parameters, what)
        described = twpb.Tensor(dtype=wire_dtype(tensor.datatype, what), shape=tensor.shape)  # type: ignore[arg-type]
        _, shape, expected = layout(described, what)
        count = limits.tensor(what, shape)
        if place is not None:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(f"{what} has contents and lies in shared memory")
            if place.byte_size != expected:
                raise InvalidArgumentError(
                    f"{what}: shared_memory_byte_size is {place.byte_size} but "
                    f"{tensor.datatype} {list(shape)} is {expected} bytes"
                )
            shared += expected
        checked.append((tensor, what, described, shape, count, place))
    in_request = sum(place is None for *_, place in checked)
    # Inputs in shared memory have no raw entry (tritonclient sends none for them).
    if raw and len(raw) != in_request:
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {in_request} inputs sent in "
            "the request; give one per input, in the order of inputs"
        )
    if shared:
        limits.request_bytes(request.payload_bytes + shared)
    named: Named[np.ndarray] = []
    entries = iter(enumerate(raw))
    for tensor, what, described, shape, count, place in checked:
        if place is not None:
            arr = read(place, described, what)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"{what} has contents while raw_input_contents is given: use one or "
                    "the other for every input"
                )
            i, entry = next(entries)
            arr = decode_array(described, entry, f"{what} (raw_input_contents[{i}])")
        else:
            arr = _typed(tensor, shape, count, what)
        named.append((tensor.name, arr))
    return named


def placement(parameters: Mapping[str, pb.InferParameter], what: str) -> Placement | None:
    """Where a tensor's parameters place it in shared memory (None: in the message),
    checked as Triton checks them: a string region, an int64 byte size that must come
    with it, an optional int64 offset, neither negative."""
    if _REGION not in parameters:
        stray = [key for key in (_BYTE_SIZE, _OFFSET) if key in parameters]
        if stray:
            raise InvalidArgumentError(f"{what}: {stray[0]} is given without {_REGION}")
        return None
    region = parameters[_REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgumentError(f"{what}: parameter {_REGION} must be a string_param")
    if _BYTE_SIZE not in parameters:
        raise InvalidArgumentError(f"{what}: {_REGION} needs {_BYTE_SIZE} too")
    numbers = []
    for key in (_BYTE_SIZE, _OFFSET):
        if key not in parameters:
            numbers.append(0)
            continue
        parameter = parameters[key]
        if parameter.WhichOneof("parameter_choice") != "int64_param":
            raise InvalidArgumentError(f"{what}: parameter {key} must be an int64_param")
        if parameter.int64_param < 0:
            raise InvalidArgumentError(f"{what}: {key} must not be negative")
        numbers.append(parameter.int64_param)
    byte_size, offset = numbers
    return Placement(region.string_param, offset, byte_size)


def _typed(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], count: int, what: str
) -> np.ndarray:
    """An input's typed contents as an array of its datatype, each value checked to
    fit (INT8 travels in int32 fields, UINT8 and UINT16 in uint32 ones)."""
    datatype = tensor.datatype
    typed = _TYPED.get(datatype)
    if typed is None:
        raise InvalidArgumentError(
            f"{what}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    name, wide = typed
    stray = [fd.name for fd, _ in tensor.contents.ListFields() if fd.name != name]
    if stray:
        raise InvalidArgumentError(
            f"{what} is {datatype}, whose elements go in contents.{name}, but its "
            f"contents fill {listed(stray)}"
        )
    values = getattr(tensor.contents, name)
    if len(values) != count:
        if not values:
            raise InvalidArgumentError(
                f"{what} has no data: give its contents.{name} or raw_input_contents"
            )
        raise InvalidArgumentError(
            f"{what}: contents.{name} holds {len(values)} elements but {datatype} "
            f"{list(shape)} needs {count}"
        )
    arr = np.fromiter(values, dtype=wide, count=count)
    target = NUMPY_BY_WIRE[_WIRE[datatype]]
    if target != wide and arr.size:
        info = np.iinfo(target)
        low, high = arr.min(), arr.max()
        if low < info.min or high > info.max:
            raise InvalidArgumentError(
                f"{what}: contents.{name} holds {low if low < info.min else high}, outside "
                f"the range of {datatype}"
            )
    return arr.astype(target, copy=False).reshape(shape)


@dataclass(frozen=True)
class Wanted:
    """What a request asks back: the outputs (empty: all) and how they travel."""

    outputs: list[str]
    #: Typed contents instead of raw_output_contents.
    typed: bool
    #: The outputs to write into shared memory, and where, by name.
    placed: dict[str, Placement] = field(default_factory=dict)


def wanted(message: pb.ModelInferRequest) -> Wanted:
    """The outputs a request asks for and whether as typed contents, from its
    parameters: binary_data_output on the request and binary_data on each output
    (both default true: raw), which must agree, since the protocol sends either every
    output raw or none. Classification and sequences are refused."""
    parameters = message.parameters
    for key in ("sequence_id", "sequence_start", "sequence_end"):
        if key in parameters and _value(parameters[key]):
            raise InvalidArgumentError(
                f"parameter {key}: sequences are not supported; tensorwire's models keep "
                "no state between requests"
            )
    default = _flag(parameters, "binary_data_output", True, "the request")
    choices: set[bool] = set()
    names: list[str] = []
    placed: dict[str, Placement] = {}
    for requested in message.outputs:
        what = f"requested output {shown(requested.name)}"
        if "classification" in requested.parameters:
            raise InvalidArgumentError(
                f"{what}: classification is not supported; ask for the output itself"
            )
        place = placement(requested.parameters, what)
        if place is not None:
            placed[requested.name] = place
        choices.add(_flag(requested.parameters, "binary_data", default, what))
        names.append(requested.name)
    if len(choices) > 1:
        raise InvalidArgumentError(
            "the requested outputs ask for raw (binary_data true) and typed (false) "
            "contents at once; the protocol sends every output one way or the other"
        )
    return Wanted(names, not (choices.pop() if choices else default), placed)


def _value(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _flag(parameters: Mapping[str, pb.InferParameter], key: str, default: bool, what: str) -> bool:
    if key not in parameters:
        return default
    parameter = parameters[key]
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgumentError(f"{what}: parameter {key} must be a bool_param")
    return parameter.bool_param


# ----------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Written:
    """An output the server already wrote where it was asked to (a CUDA region): what
    the response says of it."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Answer:
    """A ModelInferResponse and the raw output contents that follow it on the wire."""

    message: pb.ModelInferResponse
    payloads: list[memoryview]

    @property
    def payload_bytes(self) -> int:
        """The raw contents' bytes."""
        return sum(p.nbytes for p in self.payloads)

    def finish(self) -> bytes:
        """The serialized ModelInferResponse: one copy of each payload byte."""
        pieces, _ = self._pieces()
        return b"".join(pieces)

    def streamed(self) -> bytes:
        """The serialized ModelStreamInferResponse holding this response."""
        pieces, size = self._pieces()
        return framing.part(_STREAM_RESPONSE, pieces, size)

    def _pieces(self) -> tuple[list[framing.Buffer], int]:
        pieces: list[framing.Buffer] = [self.message.SerializeToString()]
        for payload in self.payloads:
            pieces.extend(framing.length_prefixed(_RAW_OUTPUTS, payload))
        return pieces, sum(memoryview(p).nbytes for p in pieces)


def answer(
    request: pb.ModelInferRequest,
    version: int,
    outputs: Named[np.ndarray | Written],
    wanted: Wanted,
    write: Write,
) -> Answer:
    """The response carrying ``outputs`` of ``version``, raw or typed; those placed
    in shared memory are written there with ``write``, and the response carries
    their name, datatype and shape only (and, raw, an empty entry, as Triton sends,
    so that each output's entry keeps its index)."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id
    )
    payloads: list[memoryview] = []
    typed = wanted.typed
    for name, arr in outputs:
        what = f"output {shown(name)}"
        datatype = datatype_of(arr, what)
        out = response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        place = wanted.placed.get(name)
        if isinstance(arr, Written):
            if not typed:
                payloads.append(memoryview(b""))
            continue
        if place is not None or not typed:
            # Cast through uint8 so ml_dtypes and bool arrays export a plain byte buffer.
            flat = memoryview(as_wire_array(arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            if place is not None:
                write(place, flat, what)
                flat = flat[:0]
            if not typed:
                payloads.append(flat)
            continue
        field_name, _ = _TYPED.get(datatype, ("", None))
        if not field_name:
            raise InvalidArgumentError(
                f"{what} is {datatype}, which has no typed contents field; ask for raw "
                "contents (binary_data true)"
            )
        getattr(out.contents, field_name).extend(arr.ravel().tolist())
    return Answer(response, payloads)


def stream_error(message: str, request: InferRequest | TensorwireError) -> bytes:
    """A serialized ModelStreamInferResponse reporting a failed request, with the
    request's model and id for the client to match it by."""
    response = pb.ModelStreamInferResponse(error_message=message)
    if isinstance(request, InferRequest):
        response.infer_response.model_name = request.message.model_name
        response.infer_response.id = request.message.id
    return response.SerializeToString()


def parse(cls: type[M]) -> Callable[[bytes], M | TensorwireError]:
    """A gRPC deserializer for ``cls`` returning a malformed message's error."""

    def deserialize(data: bytes) -> M | TensorwireError:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return InvalidArgumentError(f"malformed {cls.DESCRIPTOR.name}: {exc}")

    return deserialize
