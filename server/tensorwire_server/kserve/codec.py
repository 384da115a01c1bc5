"""The v2 protocol's tensors <-> NumPy arrays: datatypes, raw and typed contents, the
parameters of an inference request, and the framing that keeps raw contents out of
protobuf's copies.

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
from tensorwire_server.kserve import grpc_service_pb2 as pb
from tensorwire_server.limits import Limits
from tensorwire_server.named import Named

M = TypeVar("M", bound=Message)

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
_SHARED_MEMORY: Final = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


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


def datatype_of(arr: np.ndarray, what: str) -> str:
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


def inputs(request: InferRequest, limits: Limits) -> Named[np.ndarray]:
    """The request's inputs as arrays (raw ones are read-only views of the request),
    after checking datatypes, shapes, byte lengths, limits and parameters."""
    message = request.message
    raw = request.raw
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "give one per input, in the order of inputs"
        )
    named: Named[np.ndarray] = []
    for i, tensor in enumerate(message.inputs):
        what = f"input {shown(tensor.name)}"
        _no_shared_memory(tensor.parameters, what)
        described = twpb.Tensor(dtype=wire_dtype(tensor.datatype, what), shape=tensor.shape)  # type: ignore[arg-type]
        _, shape, _ = layout(described, what)
        count = limits.tensor(what, shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"{what} has contents while raw_input_contents is given: use one or "
                    "the other for every input"
                )
            arr = decode_array(described, raw[i], f"{what} (raw_input_contents[{i}])")
        else:
            arr = _typed(tensor, shape, count, what)
        named.append((tensor.name, arr))
    return named


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


def wanted(message: pb.ModelInferRequest) -> Wanted:
    """The outputs a request asks for and whether as typed contents, from its
    parameters: binary_data_output on the request and binary_data on each output
    (both default true: raw), which must agree, since the protocol sends either every
    output raw or none. Classification, shared memory and sequences are refused."""
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
    for requested in message.outputs:
        what = f"requested output {shown(requested.name)}"
        if "classification" in requested.parameters:
            raise InvalidArgumentError(
                f"{what}: classification is not supported; ask for the output itself"
            )
        _no_shared_memory(requested.parameters, what)
        choices.add(_flag(requested.parameters, "binary_data", default, what))
        names.append(requested.name)
    if len(choices) > 1:
        raise InvalidArgumentError(
            "the requested outputs ask for raw (binary_data true) and typed (false) "
            "contents at once; the protocol sends every output one way or the other"
        )
    return Wanted(names, typed=not (choices.pop() if choices else default))


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


def _no_shared_memory(parameters: Mapping[str, pb.InferParameter], what: str) -> None:
    if any(key in parameters for key in _SHARED_MEMORY):
        raise InvalidArgumentError(
            f"{what}: shared memory is not supported; send the tensor in the request"
        )


# ----------------------------------------------------------------------------- responses


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
    request: pb.ModelInferRequest, version: int, outputs: Named[np.ndarray], typed: bool
) -> Answer:
    """The response carrying ``outputs`` of ``version``, raw or typed."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id
    )
    payloads: list[memoryview] = []
    for name, arr in outputs:
        what = f"output {shown(name)}"
        datatype = datatype_of(arr, what)
        out = response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if not typed:
            # Cast through uint8 so ml_dtypes and bool arrays export a plain byte buffer.
            flat = as_wire_array(arr).reshape(-1).view(np.uint8)
            payloads.append(memoryview(flat))  # type: ignore[arg-type]
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
