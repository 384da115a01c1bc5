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

from collections.abc import Callable
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


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise InvalidArgumentError("malformed message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


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
    pos = run = start  # run: where the current stretch of untouched fields began
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            key_end = pos
            size, pos = _read_varint(buf, pos, end)
            body, pos = pos, pos + size
            if pos > end:
                raise InvalidArgumentError("malformed message: field runs past the end")
            swapped = is_tensor and number == _DATA
            if swapped or number in carriers:
                if run < field_start:
                    out.append(buf[run:field_start])
                    total += field_start - run
                parts: list[Buffer]
                if swapped:
                    new = swap(buf[body:pos])
                    parts, new_size = [new], memoryview(new).nbytes
                else:
                    parts = []
                    new_size = _reframe(buf, body, pos, carriers[number], swap, parts, depth + 1)
                prefix = _varint(new_size)
                out.append(buf[field_start:key_end])
                out.append(prefix)
                out.extend(parts)
                total += key_end - field_start + len(prefix) + new_size
                run = pos
        else:
            raise InvalidArgumentError(f"malformed message: wire type {wire_type}")
        if pos > end:
            raise InvalidArgumentError("malformed message: field runs past the end")
    if run < end:
        out.append(buf[run:end])
        total += end - run
    return total


def take_payloads(raw: bytes, desc: Descriptor) -> tuple[bytes, list[memoryview]]:
    """Split serialized ``raw`` into a small message with placeholders and the
    payload views (into ``raw``, no copy) the placeholders index."""
    payloads: list[memoryview] = []

    def swap(body: memoryview) -> bytes:
        payloads.append(body)
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
