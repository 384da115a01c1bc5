"""Mutations of valid requests: bits flipped, truncations, fields duplicated or
spliced in from another request, length prefixes that lie, overlong lengths and wrong
wire types."""

from __future__ import annotations

import random
from collections.abc import Iterator

from support.fuzz.wire import overlong, varint
from tensorwire.wire import framing


def _all_fields(
    raw: bytes, start: int, end: int, depth: int = 0
) -> Iterator[tuple[int, int, int, int]]:
    """Every field at every depth, guessing that length-delimited bodies are messages."""
    view = memoryview(raw)
    try:
        fields = list(framing.fields(view, start, end))
    except Exception:
        return
    for _, wire_type, s, b, e in fields:
        yield s, b, e, wire_type
        if wire_type == 2 and depth < 8 and e - b <= 2048:  # not into tensor payloads
            yield from _all_fields(raw, b, e, depth + 1)


def mutate(raw: bytes, other: bytes, rng: random.Random) -> bytes:
    """One to four random mutations of a serialized message."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        fields = list(_all_fields(bytes(data), 0, len(data)))
        if op == 0 and data:  # flip bits
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data) + 1) :]
        elif op == 2:  # insert random bytes
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 12))
        elif op == 3 and data:  # delete a range
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 16)]
        elif op == 4 and fields:  # duplicate a field in place
            s, _, e, _ = rng.choice(fields)
            data[e:e] = data[s:e]
        elif op == 5:  # splice in a field of another request
            theirs = list(_all_fields(other, 0, len(other)))
            if theirs:
                s, _, e, _ = rng.choice(theirs)
                at = rng.choice([0, len(data), *(f[0] for f in fields)])
                data[at:at] = other[s:e]
        elif op == 6 and fields:  # a length prefix that lies
            delimited_fields = [f for f in fields if f[3] == 2]
            if delimited_fields:
                s, b, e, _ = rng.choice(delimited_fields)
                size = e - b
                lie = rng.choice([size + 1, size - 1, size * 2 + 3, 0, 2**31, 2**63 - 1, 2**64 - 1])
                head = bytes(data[s:b])
                key_end = len(head) - len(varint(size))
                data[s + key_end : b] = varint(max(lie, 0))
        elif op == 7 and fields:  # the same length in more bytes, past ten or not
            s, b, e, w = rng.choice(fields)
            if w == 2 and data[s] < 0x80:  # a one-byte key
                data[s + 1 : b] = overlong(e - b, rng.choice([2, 5, 10, 11, 16]))
        elif op == 8 and fields:  # change a field's wire type
            s, _, _, w = rng.choice(fields)
            if data[s] < 0x80:
                data[s] = data[s] & ~7 | rng.choice([t for t in range(8) if t != w])
    return bytes(data)
