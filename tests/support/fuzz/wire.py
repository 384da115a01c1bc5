"""The protobuf wire format written by hand: varints (overlong ones too), keys,
length-delimited fields nested to any depth, and a serialized request cut into the
parts of a stream."""

from __future__ import annotations

import random
from functools import cache
from itertools import pairwise
from typing import Any

from tensorwire.wire import framing


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint; negative values as 64-bit two's complement."""
    value &= (1 << 64) - 1 if value < 0 else (1 << 80) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def overlong(value: int, length: int) -> bytes:
    """``value`` as a varint padded with continuation bytes to ``length`` bytes (a
    decoder refuses more than ten)."""
    out = bytearray(varint(value))
    while len(out) < length:
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, body: bytes) -> bytes:
    return key(number, 2) + varint(len(body)) + body


def part(number: int, body: bytes) -> bytes:
    """A *Part message: field 1 a header, field 2 a chunk."""
    return delimited(number, body)


@cache
def nested(depth: int, number: int = 2) -> bytes:
    """``depth`` length-delimited fields, each inside the last."""
    body = b""
    for _ in range(depth):
        body = delimited(number, body)
    return body


@cache
def nested_values(depth: int) -> bytes:
    """A CallRequest whose first argument is a list of a list of ... ``depth`` deep."""
    value = delimited(7, b"\x01")  # none_value
    for _ in range(depth):
        value = delimited(6, delimited(1, value))  # Value.list_value.values
    return delimited(1, b"sum") + delimited(2, value)


def to_stream(raw: bytes, desc: Any, cut: random.Random | int) -> list[bytes]:
    """A serialized request as a stream a client would send: the header with every
    Tensor's data emptied, then the payloads in chunks of ``cut`` bytes, or cut at
    random points when ``cut`` is a Random."""
    payloads: list[bytes] = []

    def swap(body: memoryview) -> bytes:
        payloads.append(bytes(body))
        return b""

    pieces: list[Any] = []
    framing._reframe(memoryview(raw), 0, len(raw), desc, swap, pieces, 0)
    data = b"".join(payloads)
    if isinstance(cut, int):
        points = set(range(0, len(data), cut))
    else:
        points = {cut.randrange(len(data) + 1) for _ in range(cut.randrange(4))}
    cuts = sorted({0, len(data), *points})
    chunks = [data[a:b] for a, b in pairwise(cuts)]
    return [part(1, b"".join(pieces)), *(part(2, c) for c in chunks)]
