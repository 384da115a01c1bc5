"""Protobuf wire framing that moves tensor payloads around protobuf's own copies.

Python protobuf copies a ``bytes`` field on every set, read and serialize, which for a
large tensor costs more than the network. Large messages therefore travel as ordinary
protobuf wire bytes that we splice ourselves: on the way out, the message is built with
a 4-byte placeholder in each ``Tensor.data`` and serialized (small), then every
placeholder is swapped for the array's memory; on the way in, each ``Tensor.data`` is
swapped for a placeholder and kept as a ``memoryview`` of the received bytes (no copy)
before protobuf parses the now small message. Any protobuf peer reads the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from tensorwire.errors import InvalidArgumentError
from tensorwire.v1 import tensorwire_pb2 as pb

Buffer = bytes | memoryview
# Message descriptors come from upb or pure Python; both have the same shape.
Descriptor = Any

_TENSOR = pb.Tensor.DESCRIPTOR
_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_MAX_DEPTH = 64
PLACEHOLDER_SIZE = 4
# Field numbers shared by every *Part message of the streaming RPCs.
PART_HEADER = 1
PART_CHUNK = 2
#: A DataTransfer: the payloads travel over the data port (wire/dataport.py).
PART_DATA = 3


def placeholder(index: int) -> bytes:
    """The stand-in written in ``Tensor.data`` for payload ``index``; never empty."""
    return index.to_bytes(PLACEHOLDER_SIZE, "little")


def placeholder_index(data: bytes) -> int:
    """The payload index a placeholder stands for."""
    return int.from_bytes(data, "little")


@cache
def _carriers(desc: Descriptor) -> dict[int, Descriptor]:
    """Field numbers of ``desc`` whose message type holds a Tensor at some depth."""
    found: dict[int, Descriptor] = {}
    for field in desc.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and _holds_tensor(field.message_type, ()):
            found[field.number] = field.message_type
    return found


def _holds_tensor(desc: Descriptor, seen: tuple[str, ...]) -> bool:
    if desc.full_name == _TENSOR.full_name:
        return True
    if desc.full_name in seen:
        return False
    seen = (*seen, desc.full_name)
    return any(
        f.type == FieldDescriptor.TYPE_MESSAGE and _holds_tensor(f.message_type, seen)
        for f in desc.fields
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int, limit: int = 10) -> tuple[int, int]:
    """The varint at ``pos`` of at most ``limit`` bytes, and where it ends. Keys and
    lengths take at most 5, as protobuf's parsers allow: this walker re-encodes the
    ones it splices, so a longer one would pass here and nowhere else."""
    value = shift = 0
    while True:
        if pos >= end or shift >= 7 * limit:
            raise InvalidArgumentError("malformed message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Walk the fields of the message in ``buf[start:end]``: for each, its number, where
    it starts, where its key (and for a length-delimited field, its length) ends, and
    where it ends. Only length-delimited fields (wire type 2) have a body between the
    last two; InvalidArgumentError for anything malformed."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end, 5)
        number, wire_type = key >> 3, key & 7
        body = pos
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
            body = pos
        elif wire_type == 1:
            pos = body = pos + 8
        elif wire_type == 5:
            pos = body = pos + 4
        elif wire_type == 2:
            size, body = _read_varint(buf, pos, end, 5)
            pos = body + size
        else:
            raise InvalidArgumentError(f"malformed message: wire type {wire_type}")
        if pos > end:
            raise InvalidArgumentError("malformed message: field runs past the end")
        yield number, wire_type, field_start, body, pos


def length_prefixed(number: int, body: Buffer) -> list[Buffer]:
    """Field ``number`` (wire type 2) holding ``body``, as pieces to join."""
    return [_varint(number << 3 | 2), _varint(memoryview(body).nbytes), body]


def _reframe(
    buf: memoryview,
    start: int,
    end: int,
    desc: Descriptor,
    swap: Callable[[memoryview], Buffer],
    out: list[Buffer],
    depth: int,
) -> int:
    """Copy ``buf[start:end]`` (a ``desc`` message) to ``out`` as slices, with every
    Tensor.data body replaced by ``swap(body)``; return the new length."""
    if depth > _MAX_DEPTH:
        raise InvalidArgumentError("malformed message: nested too deeply")
    carriers = _carriers(desc)
    is_tensor = desc.full_name == _TENSOR.full_name
    total = 0
    run = start  # where the current stretch of untouched fields began
    swapped_data = False
    for number, wire_type, field_start, body, field_end in fields(buf, start, end):
        if wire_type != 2:
            continue
        swapped = is_tensor and number == _DATA
        if not (swapped or number in carriers):
            continue
        if run < field_start:
            out.append(buf[run:field_start])
            total += field_start - run
        pieces: list[Buffer]
        if swapped:
            swapped_data = True
            pieces = length_prefixed(number, swap(buf[body:field_end]))
        else:
            inner: list[Buffer] = []
            size = _reframe(buf, body, field_end, carriers[number], swap, inner, depth + 1)
            pieces = [_varint(number << 3 | 2), _varint(size), *inner]
        out.extend(pieces)
        total += sum(memoryview(p).nbytes for p in pieces)
        run = field_end
    if run < end:
        out.append(buf[run:end])
        total += end - run
    if is_tensor and not swapped_data:
        # proto3 writers leave an empty data field out; it is a (zero-byte) payload
        # all the same, so it is swapped like one and counts in a stream's order.
        pieces = length_prefixed(_DATA, swap(memoryview(b"")))
        out.extend(pieces)
        total += sum(memoryview(p).nbytes for p in pieces)
    return total


def take_payloads(
    raw: bytes, desc: Descriptor, count: Callable[[int], None] | None = None
) -> tuple[bytes, list[memoryview]]:
    """Split serialized ``raw`` into a small message with placeholders and the
    payload views (into ``raw``, no copy) the placeholders index. ``count`` hears the
    number of tensors so far after each (a receiver's limit raises there)."""
    payloads: list[memoryview] = []

    def swap(body: memoryview) -> bytes:
        payloads.append(body)
        if count is not None:
            count(len(payloads))
        return placeholder(len(payloads) - 1)

    parts: list[Buffer] = []
    view = memoryview(raw)
    _reframe(view, 0, len(view), desc, swap, parts, 0)
    return b"".join(parts), payloads


def put_payloads(small: bytes, desc: Descriptor, payloads: list[memoryview]) -> bytes:
    """Serialize: ``small`` with each placeholder replaced by its payload; the one
    copy of each payload byte is the final join."""

    def swap(body: memoryview) -> Buffer:
        return payloads[placeholder_index(bytes(body))]

    parts: list[Buffer] = []
    _reframe(memoryview(small), 0, len(small), desc, swap, parts, 0)
    return b"".join(parts)


def strip_payloads(
    small: bytes, desc: Descriptor, payloads: list[memoryview]
) -> tuple[bytes, list[memoryview]]:
    """A stream header: ``small`` with every placeholder emptied, and the payloads in
    the order their tensors occur in it (the order their chunks travel in)."""
    ordered: list[memoryview] = []

    def swap(body: memoryview) -> bytes:
        ordered.append(payloads[placeholder_index(bytes(body))])
        return b""

    parts: list[Buffer] = []
    _reframe(memoryview(small), 0, len(small), desc, swap, parts, 0)
    return b"".join(parts), ordered


def number_payloads(
    header: Buffer, desc: Descriptor, check: Callable[[int], None] | None = None
) -> tuple[bytes, int]:
    """A received stream header with each tensor's empty data replaced by the
    placeholder of its position in the stream; also the count of tensors, which
    ``check`` hears after each (a receiver's limit raises there)."""
    count = 0

    def swap(body: memoryview) -> bytes:
        nonlocal count
        if check is not None:
            check(count + 1)
        if body.nbytes:
            raise InvalidArgumentError(
                "malformed stream: a header tensor carries inline data; payloads travel "
                "in the chunks that follow the header"
            )
        count += 1
        return placeholder(count - 1)

    parts: list[Buffer] = []
    view = memoryview(header)
    _reframe(view, 0, view.nbytes, desc, swap, parts, 0)
    return b"".join(parts), count


def split_part(raw: bytes) -> tuple[int, memoryview]:
    """The field number and body (a view, no copy) of a serialized *Part message:
    a oneof of a header message (field 1), a bytes chunk (field 2) and a data-plane
    transfer (field 3)."""
    view = memoryview(raw)
    found: tuple[int, memoryview] | None = None
    for number, wire_type, _, body, field_end in fields(view, 0, view.nbytes):
        if wire_type == 2 and number in (PART_HEADER, PART_CHUNK, PART_DATA):
            found = (number, view[body:field_end])  # the last of a oneof wins
    if found is None:
        raise InvalidArgumentError("malformed stream: a part with neither header nor chunk")
    return found


def part(number: int, pieces: Sequence[Buffer], size: int) -> bytes:
    """Serialize a *Part message whose field ``number`` holds ``pieces`` (``size`` bytes
    in all) joined: one copy."""
    return b"".join([_varint(number << 3 | 2), _varint(size), *pieces])
