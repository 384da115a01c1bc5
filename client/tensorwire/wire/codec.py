"""The one codec: NumPy arrays and Call arguments <-> tensorwire.v1 wire messages.

Torch-free, shared by the client and the server. Encoding copies a payload at most
once (to little-endian C order when it is not already); decoding returns a view of
the received bytes, validated before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from tensorwire.errors import InvalidArgumentError, TensorwireError, shown
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing
from tensorwire.wire.dtypes import NAME_BY_WIRE, NUMPY_BY_WIRE, WIRE_BY_NAME, dtype_name, wire_dtype
from tensorwire.wire.protocol import MAX_HANDLE_LENGTH

M = TypeVar("M", bound=Message)

# Messages whose payloads add up to less than this travel through plain protobuf:
# splicing costs a few microseconds that only pay off once copies cost more.
INLINE_LIMIT = 64 * 1024
_INT64_MAX = 2**63 - 1
# The most dimensions a NumPy array can have: 64 since NumPy 2, 32 before.
_MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32


@dataclass(frozen=True)
class Handle:
    """A tensor held in a session on the server: its id, dtype name and shape."""

    id: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Ref:
    """A name inside a Run program: a program input, or an earlier step's output as
    ``step`` or ``step.output``."""

    name: str


# A Call argument: tensors (data or handles) and plain values only, never callables
# or code; a Ref only inside a Run program.
Arg = np.ndarray | Handle | Ref | bool | int | float | str | None | Sequence["Arg"]


def as_handle(value: Any) -> Handle | None:
    """The Handle ``value`` is or carries (a client's RemoteTensor has ``.handle``)."""
    if type(value) is np.ndarray:  # most tensors: no attribute lookup to fail
        return None
    if isinstance(value, Handle):
        return value
    handle = getattr(value, "handle", None)
    return handle if isinstance(handle, Handle) else None


def as_wire_array(arr: np.ndarray) -> np.ndarray:
    """``arr`` as little-endian C-contiguous, copying only when it is not already."""
    target = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if arr.dtype == target and arr.flags.c_contiguous:
        return arr
    return np.asarray(arr.astype(target, order="C", copy=True))


def _element_count(shape: Sequence[int], name: str, itemsize: int) -> int:
    if len(shape) > _MAX_DIMS:
        raise InvalidArgumentError(
            f"{name}: shape has {len(shape)} dimensions, more than the {_MAX_DIMS} an array "
            "can have"
        )
    count = 1
    extent = itemsize  # bytes, counting 0 as 1: NumPy refuses past 2**63-1 even when empty
    for dim in shape:
        if dim < 0:
            raise InvalidArgumentError(f"{name}: negative dimension in shape {list(shape)}")
        count *= dim
        extent *= dim or 1
    if count > _INT64_MAX:
        raise InvalidArgumentError(f"{name}: shape {list(shape)} has more than 2**63-1 elements")
    if extent > _INT64_MAX:
        raise InvalidArgumentError(
            f"{name}: shape {list(shape)} is too large for an array: its nonzero dimensions "
            "span more than 2**63-1 bytes"
        )
    return count


def layout(tensor: pb.Tensor, name: str) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """The NumPy dtype, shape and byte size ``tensor`` declares, after checking them;
    InvalidArgumentError naming ``name`` if they are not valid."""
    dtype = NUMPY_BY_WIRE.get(tensor.dtype)
    if dtype is None:
        if tensor.dtype == pb.DTYPE_UNSPECIFIED:
            raise InvalidArgumentError(f"{name}: no dtype given")
        raise InvalidArgumentError(f"{name}: {dtype_name(tensor.dtype)} is not supported")
    shape = tuple(tensor.shape)
    return dtype, shape, _element_count(shape, name, dtype.itemsize) * dtype.itemsize


def decode_array(tensor: pb.Tensor, payload: framing.Buffer, name: str) -> np.ndarray:
    """A view of ``payload`` as the array ``tensor`` describes, after checking dtype,
    shape and length; InvalidArgumentError naming ``name`` if not."""
    dtype, shape, expected = layout(tensor, name)
    got = memoryview(payload).nbytes
    if got != expected:
        raise InvalidArgumentError(
            f"{name}: payload has {got} bytes but {dtype_name(tensor.dtype)} {list(shape)} "
            f"needs {expected}"
        )
    arr = np.frombuffer(payload, dtype=dtype).reshape(shape)
    if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise InvalidArgumentError(f"{name}: bool payload holds bytes other than 0 and 1")
    return arr


def tensors_in(message: Message, path: str = "") -> Iterator[tuple[str, pb.Tensor]]:
    """Every Tensor inside ``message`` at any depth, with a name for error messages."""
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        where = f"{path}.{fd.name}" if path else fd.name
        items: Iterable[tuple[str, Any]]
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is None:
                continue  # a map of scalars, such as batch sizes: no tensors there
            items = ((f"{where}[{shown(k)}]", v) for k, v in value.items())
        elif not isinstance(value, Message):
            # A repeated field (a container of messages). Not fd.is_repeated nor fd.label:
            # protobuf 5 has only the one, protobuf 7 only the other.
            items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
        else:
            items = ((where, value),)
        for name, item in items:
            if not isinstance(item, Message):
                continue
            if isinstance(item, pb.Tensor):
                yield name, item
            elif isinstance(item, pb.NamedTensor):
                if item.HasField("tensor"):
                    yield (f"{where} {shown(item.name)}" if item.name else name), item.tensor
            else:
                yield from tensors_in(item, name)


@dataclass
class Encoder(Generic[M]):
    """Builds one outgoing ``message``: tensors are written as placeholders and their
    memory kept aside, then ``finish`` serializes it with one copy per payload byte
    (or ``tensorwire.streaming.parts`` splits it into a stream)."""

    message: M
    _slots: list[tuple[pb.Tensor, memoryview]] = field(default_factory=list)
    # The payload bytes queued, counted as they are: a call asks before it is sent
    # (whether to stream) and again as it is (whether to splice), each attempt.
    _queued: int = field(default=0, init=False, repr=False)
    # The message's Tensors hold their payloads, not placeholders (a small message
    # finished): kept so for the next attempt, put back before anything else.
    _inlined: bool = field(default=False, init=False, repr=False)

    @property
    def payload_bytes(self) -> int:
        """The tensor payload bytes queued so far."""
        return self._queued

    def tensor(self, out: pb.Tensor, arr: np.ndarray | Handle) -> None:
        """Describe ``arr`` in ``out`` and queue its bytes, or name a handle."""
        self._placeholders()
        handle = as_handle(arr)
        if handle is not None:
            out.handle = handle.id
            out.dtype = WIRE_BY_NAME.get(handle.dtype, pb.DTYPE_UNSPECIFIED)  # type: ignore[assignment]
            out.shape[:] = handle.shape
            # An empty payload of its own: the framing numbers every Tensor's data in
            # order, so a handle must hold a placeholder too, or the arrays after it
            # would land in the wrong tensors of a large or streamed message.
            out.data = framing.placeholder(len(self._slots))
            self._slots.append((out, memoryview(b"")))
            return
        assert not isinstance(arr, Handle)
        try:
            out.dtype = wire_dtype(arr.dtype)  # type: ignore[assignment]
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        out.shape[:] = arr.shape
        wire = as_wire_array(arr)
        # Cast through uint8 so ml_dtypes and bool arrays export a plain byte buffer.
        data = memoryview(wire.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        out.data = framing.placeholder(len(self._slots))
        self._slots.append((out, data))
        self._queued += data.nbytes

    def named(self, out: pb.NamedTensor, name: str, arr: np.ndarray | Handle) -> None:
        """Fill ``out`` with ``name`` and ``arr``."""
        out.name = name
        self.tensor(out.tensor, arr)

    def value(self, out: pb.Value, arg: Any, name: str) -> None:
        """Fill ``out`` with a Call argument; InvalidArgumentError for other types."""
        if arg is None:
            out.none_value = True
        elif isinstance(arg, bool | np.bool_):
            out.bool_value = bool(arg)
        elif isinstance(arg, int | np.integer):
            out.int_value = int(arg)
        elif isinstance(arg, float | np.floating) and not isinstance(arg, np.ndarray):
            out.float_value = float(arg)
        elif isinstance(arg, str):
            out.string_value = arg
        elif isinstance(arg, np.ndarray) or as_handle(arg) is not None:
            self.tensor(out.tensor, arg)
        elif isinstance(arg, Ref):
            out.ref = arg.name
        elif isinstance(arg, list | tuple):
            out.list_value.SetInParent()
            for i, item in enumerate(arg):
                self.value(out.list_value.values.add(), item, f"{name}[{i}]")
        else:
            raise InvalidArgumentError(
                f"{name}: a {type(arg).__name__} cannot be sent; use arrays, numbers, "
                "strings, None or lists of them"
            )

    def finish(self) -> bytes:
        """Serialize the message, whose tensors were all filled by this encoder."""
        if self._queued < INLINE_LIMIT:
            if not self._inlined:  # a retry finds them in place
                for out, data in self._slots:
                    out.data = data.tobytes()
                self._inlined = True
            return bytes(self.message.SerializeToString())
        self._placeholders()
        small = self.message.SerializeToString()
        return framing.put_payloads(small, self.message.DESCRIPTOR, self._payloads())

    def header(self) -> tuple[bytes, list[memoryview]]:
        """The message as a stream header (every Tensor's data empty) and the
        payloads in the order their chunks follow it."""
        self._placeholders()
        small = self.message.SerializeToString()
        return framing.strip_payloads(small, self.message.DESCRIPTOR, self._payloads())

    def _placeholders(self) -> None:
        """Put the placeholders back where ``finish`` wrote a small message's
        payloads: a new tensor is numbered among them, and a stream's header
        (a retry that streams) and the splicing read them."""
        if self._inlined:
            for index, (out, _) in enumerate(self._slots):
                out.data = framing.placeholder(index)
            self._inlined = False

    def _payloads(self) -> list[memoryview]:
        return [data for _, data in self._slots]


@dataclass(frozen=True)
class Received(Generic[M]):
    """A parsed message and, for a large one, the payload views its placeholders index.
    ``owned``: the payloads are private writable buffers (a stream's), not gRPC's bytes."""

    message: M
    payloads: list[memoryview] | None = None
    owned: bool = False
    #: Turns a Tensor naming a handle into what it holds (the server's session
    #: lookup); None gives the Handle itself (the client's view of a response).
    resolve: Callable[[Handle, str], Any] | None = None

    @property
    def payload_bytes(self) -> int:
        """The tensor payload bytes the message carries."""
        if self.payloads is not None:
            return sum(p.nbytes for p in self.payloads)
        return sum(len(t.data) for _, t in tensors_in(self.message))

    def array(self, tensor: pb.Tensor, name: str) -> Any:
        """The array a Tensor of this message holds (a read-only view), or for a
        handle what ``resolve`` makes of it."""
        if tensor.handle:
            return self.handle(tensor, name)
        if self.payloads is None or not tensor.data:
            return decode_array(tensor, tensor.data, name)
        index = framing.placeholder_index(tensor.data)
        return decode_array(tensor, self.payloads[index], name)

    def handle(self, tensor: pb.Tensor, name: str) -> Any:
        """The Handle a Tensor names, or what ``resolve`` makes of it."""
        data = tensor.data
        if data and self.payloads is not None:  # a placeholder: its payload must be empty
            data = bytes(self.payloads[framing.placeholder_index(data)][:1])
        if data:
            raise InvalidArgumentError(f"{name}: a tensor gives either a handle or data, not both")
        if len(tensor.handle) > MAX_HANDLE_LENGTH:
            raise InvalidArgumentError(f"{name}: handle {shown(tensor.handle)} is too long")
        dtype = NAME_BY_WIRE.get(tensor.dtype, "")
        handle = Handle(tensor.handle, dtype, tuple(tensor.shape))
        return handle if self.resolve is None else self.resolve(handle, name)

    def named(self, tensors: Sequence[pb.NamedTensor], what: str) -> list[tuple[str, Any]]:
        """Decode a repeated NamedTensor field; ``what`` names it in errors."""
        return [
            (nt.name, self.array(nt.tensor, f"{what} {shown(nt.name) if nt.name else i}"))
            for i, nt in enumerate(tensors)
        ]

    def value(self, value: pb.Value, name: str) -> Arg:
        """Decode one Call argument."""
        kind = value.WhichOneof("kind")
        if kind == "tensor":
            tensor: Arg = self.array(value.tensor, name)
            return tensor
        if kind == "list_value":
            return [self.value(v, f"{name}[{i}]") for i, v in enumerate(value.list_value.values)]
        if kind == "none_value":
            return None
        if kind == "ref":
            return Ref(value.ref)
        if kind is None:
            raise InvalidArgumentError(f"{name}: empty value")
        result: Arg = getattr(value, kind)
        return result

    def arguments(
        self, args: Sequence[pb.Value], kwargs: Mapping[str, pb.Value]
    ) -> tuple[list[Arg], dict[str, Arg]]:
        """Decode positional and keyword Call arguments."""
        return (
            [self.value(v, f"argument {i}") for i, v in enumerate(args)],
            {k: self.value(v, f"argument {shown(k)}") for k, v in kwargs.items()},
        )


def receiver(
    cls: type[M], count: Callable[[int], None] | None = None
) -> Callable[[bytes], Received[M] | TensorwireError]:
    """A gRPC deserializer for ``cls`` that returns a malformed message's error instead
    of raising: gRPC would turn an exception there into an opaque INTERNAL/UNKNOWN.
    ``count``: see ``receive``."""

    def deserialize(raw: bytes) -> Received[M] | TensorwireError:
        try:
            return receive(cls, raw, count)
        except TensorwireError as exc:
            return exc

    return deserialize


def receive(cls: type[M], raw: bytes, count: Callable[[int], None] | None = None) -> Received[M]:
    """Parse ``raw`` as ``cls``; payloads of a large message stay views into ``raw``.
    ``count`` hears a large message's tensors as they are found, before protobuf
    parses it, and may refuse there (a small one's are few: its reader counts them)."""
    try:
        if len(raw) < INLINE_LIMIT:
            return Received(cls.FromString(raw))
        small, payloads = framing.take_payloads(raw, cls.DESCRIPTOR, count)
        return Received(cls.FromString(small), payloads)
    except DecodeError as exc:
        raise InvalidArgumentError(f"malformed {cls.DESCRIPTOR.name}: {exc}") from None
