"""Malformed streams: valid ones with parts dropped, repeated, swapped, cut short or
added, random parts, headers that declare tensors past any memory, and large uploads
that end short or run over."""

from __future__ import annotations

import random

from support.fuzz.harness import Fuzzer
from support.fuzz.hostile import WIRE_DTYPES
from support.fuzz.mutations import mutate
from support.fuzz.valid import SEEDS, VALID_BYTES, VALID_STREAMS, stream_header
from support.fuzz.wire import key, part, varint
from tensorwire.wire import framing

HUGE_SHAPES = [[2**60], [2**40, 2**40], [2**31, 2**31], [2**62, 4], [2**41], [2**20] * 3]


def random_part(name: str, good: list[bytes], rng: random.Random) -> bytes:
    """A part that may or may not belong in the stream of ``name``."""
    choice = rng.randrange(13)
    if choice == 0:
        return good[0]  # a (second?) good header
    if choice == 1:
        return rng.choice(good[1:] or good)  # a good chunk, maybe out of place
    if choice == 2:
        return part(2, rng.randbytes(rng.choice([0, 1, 7, 64, 300])))
    if choice == 3:  # a header with its data inline
        twin = name.removesuffix("Stream")
        return part(1, rng.choice([raw for n, raw in VALID_BYTES if n == twin] or [b""]))
    if choice == 4:
        return stream_header(name, rng.choice(HUGE_SHAPES), rng.choice(WIRE_DTYPES))
    if choice == 5:
        return b""
    if choice == 6:
        return rng.randbytes(rng.randrange(40))
    if choice == 7:  # header and chunk in one part: the last wins
        body = rng.choice(good[1:] or good)
        return good[0] + body if rng.random() < 0.5 else body + good[0]
    if choice == 8:
        return key(3, 0) + varint(rng.randrange(2**64))  # an unknown field only
    if choice == 9:
        return key(1, 0) + varint(5)  # the header field as a varint
    if choice == 10:  # the header of another RPC
        return rng.choice([p for n, p in VALID_STREAMS.values() if n != name])[0]
    if choice == 11:
        return part(1, mutate(bytes(framing.split_part(good[0])[1]), good[0], rng))
    return part(2, b"")  # an empty chunk


def malformed_stream(name: str, rng: random.Random) -> list[bytes]:
    good = rng.choice(SEEDS[name])
    how = rng.randrange(8)
    if how == 0:  # nothing but random parts
        return [random_part(name, good, rng) for _ in range(rng.randrange(6))]
    parts = list(good)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(parts) + 1)
        op = rng.randrange(6)
        if op == 0 and parts:
            del parts[min(at, len(parts) - 1)]
        elif op == 1 and parts:
            parts.insert(at, parts[min(at, len(parts) - 1)])
        elif op == 2 and len(parts) > 1:
            i, j = rng.sample(range(len(parts)), 2)
            parts[i], parts[j] = parts[j], parts[i]
        elif op == 3 and len(parts) > 1:  # a part short by some bytes
            i = rng.randrange(1, len(parts))
            parts[i] = parts[i][: -rng.randint(1, 5)]
        elif op == 4:  # one chunk too many
            parts.append(part(2, rng.randbytes(rng.randint(1, 9))))
        else:
            parts.insert(at, random_part(name, good, rng))
    return parts


def large_uploads_cut_short(fuzz: Fuzzer, kind: str) -> None:
    """Uploads of 8 MiB tensors (128 MiB in all) that end 2 MiB short or run 2 MiB
    over, a few at a time: each buffer must go back when its stream is refused."""
    header, mib = stream_header("InferStream", [8 << 20]), part(2, bytes(1 << 20))
    for _ in range(4):
        fuzz.send(kind, streams=[("InferStream", [header, *[mib] * n], True) for n in (6, 10) * 2])
    fuzz.settle()
