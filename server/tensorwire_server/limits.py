"""The request limits, checked from what a request declares before memory is committed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tensorwire.errors import DeadlineExceededError, ResourceExhaustedError, shown
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Received, tensors_in
from tensorwire_server.settings import Settings


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (the settings of the same names)."""

    max_request_bytes: int
    max_tensor_elements: int
    max_stream_seconds: float
    max_request_tensors: int = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits ``settings`` set."""
        return cls(
            settings.max_request_bytes,
            settings.max_tensor_elements,
            settings.max_stream_seconds,
            settings.max_request_tensors,
        )

    def tensor_count(self, count: int) -> None:
        """Refuse a request once it is found to hold more tensors than allowed (called
        as they are counted, so that the count stops there)."""
        if count > self.max_request_tensors:
            raise ResourceExhaustedError(
                f"the request holds more than {self.max_request_tensors} tensors, the "
                f"server's max_request_tensors"
            )

    def tensor(self, name: str, shape: tuple[int, ...]) -> int:
        """Refuse a tensor with more elements than allowed; its element count."""
        count = 1
        for dim in shape:
            count *= dim
        if count > self.max_tensor_elements:
            raise ResourceExhaustedError(
                f"{name}: {count} elements, more than the server's max_tensor_elements "
                f"({self.max_tensor_elements})"
            )
        return count

    def request_bytes(self, total: int) -> None:
        """Refuse a request whose payloads add up to more than allowed."""
        if total > self.max_request_bytes:
            raise ResourceExhaustedError(
                f"the request carries {total} payload bytes, more than the server's "
                f"max_request_bytes ({self.max_request_bytes})"
            )

    def received(self, request: Received[Any]) -> int:
        """Check every tensor of a unary request (its bytes gRPC already bounded; the
        rest of each tensor's description is the decoder's to check) and their count;
        its payload bytes, counted on the same walk."""
        message = request.message
        field = _named_tensors(message.DESCRIPTOR)
        if field is not None:
            inline = self._named(field, getattr(message, field))
        else:
            inline = 0
            for count, (name, tensor) in enumerate(tensors_in(message), 1):
                self.tensor_count(count)
                self.tensor(name, tuple(tensor.shape))
                inline += len(tensor.data)
        # A spliced message's tensors hold placeholders; its payloads are views.
        return inline if request.payloads is None else request.payload_bytes

    def _named(self, field: str, items: Any) -> int:
        """``received`` of a message whose only tensors are repeated NamedTensor
        ``field`` (an InferRequest's inputs): the same checks in the same order, with
        the same names in their errors, as ``tensors_in``'s walk, without the walk's
        generators (a few µs of every small call)."""
        inline = count = 0
        most_tensors, most_elements = self.max_request_tensors, self.max_tensor_elements
        for index, item in enumerate(items):
            if not item.HasField("tensor"):
                continue
            count += 1
            if count > most_tensors:
                self.tensor_count(count)
            tensor = item.tensor
            elements = 1
            for dim in tensor.shape:
                elements *= dim
            if elements > most_elements:
                self.tensor(
                    f"{field} {shown(item.name)}" if item.name else f"{field}[{index}]",
                    tuple(tensor.shape),
                )
            inline += len(tensor.data)
        return inline

    def stream_time(self, seconds: float) -> None:
        """Refuse a stream that has taken longer than allowed to arrive."""
        if seconds > self.max_stream_seconds:
            raise DeadlineExceededError(
                f"the request stream took more than the server's max_stream_seconds "
                f"({self.max_stream_seconds:g} s) to arrive"
            )


#: Message type -> its one repeated NamedTensor field, when that is its only field
#: that holds messages (None: any other shape, walked by tensors_in).
_NAMED_FIELD: dict[str, str | None] = {}


def _named_tensors(descriptor: Descriptor) -> str | None:
    """The field ``Limits._named`` may check messages of ``descriptor`` by, if any."""
    try:
        return _NAMED_FIELD[descriptor.full_name]
    except KeyError:
        pass
    holding = [fd for fd in descriptor.fields if fd.message_type is not None]
    found = None
    if (
        len(holding) == 1
        and holding[0].message_type is pb.NamedTensor.DESCRIPTOR
        and _repeated(holding[0])
    ):
        found = holding[0].name
    _NAMED_FIELD[descriptor.full_name] = found
    return found


def _repeated(fd: FieldDescriptor) -> bool:
    # protobuf 5 has only ``label``, protobuf 7 only ``is_repeated``.
    is_repeated = getattr(fd, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return bool(getattr(fd, "label", None) == FieldDescriptor.LABEL_REPEATED)
