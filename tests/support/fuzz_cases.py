"""What the fuzz suite (tests/v1/test_fuzz.py) sends: raw bytes and wire-format field soup,
mutations of valid requests, hostile values in well-formed messages, malformed streams,
and what fuzzing found, pinned."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from support.fuzzing import (
    FUNCTION_NAMES,
    MODEL_INPUTS,
    MODELS,
    SEEDS,
    VALID_BYTES,
    VALID_STREAMS,
    delimited,
    key,
    nested,
    nested_values,
    overlong,
    part,
    stream_header,
    varint,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing
from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME
from tensorwire_server.engine.functions import FUNCTIONS

# ------------------------------------------------------------------ (a) raw bytes

SPECIAL_NUMBERS = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 2**29 - 1, 2**29, 2**32, 2**61]
numbers = st.one_of(st.integers(1, 9), st.sampled_from(SPECIAL_NUMBERS))
varint_values = st.one_of(
    st.integers(0, 300),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]),
    st.integers(-(2**63), 2**64 - 1),
)


@st.composite
def wire_field(draw: st.DrawFn, inner: st.SearchStrategy[bytes] | None = None) -> bytes:
    """One field of any wire type, well-formed or not."""
    number = draw(numbers)
    wire_type = draw(st.integers(0, 7))
    if wire_type == 0:
        return key(number, 0) + varint(draw(varint_values))
    if wire_type in (1, 5):
        return key(number, wire_type) + draw(st.binary(max_size=10))
    if wire_type == 2:
        body = (
            draw(inner)
            if inner is not None and draw(st.booleans())
            else draw(st.binary(max_size=40))
        )
        lie = draw(st.sampled_from([0, 0, 0, 1, -1, 7, 2**31, 2**62]))
        return key(number, 2) + varint(max(len(body) + lie, 0)) + body
    if wire_type == 3 and inner is not None:  # a group, ended or not
        return key(number, 3) + draw(inner) + draw(st.sampled_from([key(number, 4), b""]))
    return key(number, wire_type) + draw(st.binary(max_size=4))


field_soup = st.recursive(
    st.lists(wire_field(), max_size=6).map(b"".join),
    lambda inner: st.lists(wire_field(inner), min_size=1, max_size=4).map(b"".join),
    max_leaves=12,
)
# Around the parsers' limits (protobuf's 100, our splicer's 64) and far past them.
depths = st.integers(1, 120) | st.sampled_from(
    [31, 32, 33, 49, 50, 51, 63, 64, 65, 99, 100, 101, 3000]
)
raw_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1, max_size=3000),
    field_soup,
    field_soup.map(lambda b: b + delimited(15, bytes(70_000))),  # past INLINE_LIMIT
    depths.map(nested),
    depths.map(lambda d: key(3, 3) * d + key(3, 4) * d),  # unknown groups in groups
    depths.map(nested_values),
    depths.map(lambda d: nested_values(d) + delimited(15, bytes(70_000))),
    st.sampled_from(
        [
            b"",
            b"\xff" * 11,  # an overlong key
            b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong value
            b"\x0a" + varint(2**63) + b"x",  # a length past the end
            b"\x12\xff\xff\xff\xff\x0f",  # a 4 GiB length, no body
            b"\x0f",  # wire type 7
            b"\x0c",  # an end group with no start
            b"\x0b" * 200,  # groups never ended
            b"\x00",  # field number 0
            bytes(range(256)),
        ]
    ),
)


# ------------------------------------------------------------------ (b) mutations


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


# ------------------------------------------------------------------ (c) hostile values

WIRE_DTYPES = sorted(NUMPY_BY_WIRE)
SMALL_INTS = st.integers(-3, 8)
# Far past any memory (a size from them fails to allocate at once) or past int64.
HUGE_INTS = st.sampled_from([2**40, -(2**40), 2**62, -(2**62), 2**63 - 1, -(2**63)])
FLOATS = st.one_of(
    st.floats(-10, 10),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 5e-324, -0.0]),
)
names = st.one_of(
    st.sampled_from(["", "input", "output", "x", "y", "sum", "prod", "a", "0", "1", "-1"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["\x00", "名前", "é\u0301", "input ", "a" * 10_000, "b" * 100_000]),
)
dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**40, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)


@dataclass(frozen=True)
class Hostile:
    """A generated message part and whether it is certainly refused where it is used."""

    message: Any
    bad: bool


@st.composite
def good_tensor(
    draw: st.DrawFn, dtypes: Sequence[int] = WIRE_DTYPES, ndim: int | None = None
) -> Hostile:
    """A valid tensor: known dtype, small shape, exactly its bytes (bool: 0 or 1)."""
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(0, 3)) if ndim is None else ndim
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank))
    size = int(np.prod(shape)) * NUMPY_BY_WIRE[dtype].itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    if dtype == pb.DTYPE_BOOL:
        data = bytes(b & 1 for b in data)
    return Hostile(pb.Tensor(dtype=dtype, shape=shape, data=data), False)


@st.composite
def bad_tensor(draw: st.DrawFn) -> Hostile:
    """A tensor every receiver must refuse, one fault at a time."""
    tensor: pb.Tensor = draw(good_tensor()).message
    fault = draw(st.integers(0, 7))
    if fault == 0:
        tensor.dtype = pb.DTYPE_UNSPECIFIED
    elif fault == 1:
        tensor.dtype = draw(
            st.integers(len(WIRE_DTYPES) + 1, 2**31 - 1) | st.integers(-(2**31), -1)
        )
    elif fault == 2:
        tensor.shape.insert(
            draw(st.integers(0, len(tensor.shape))), draw(st.integers(-(2**63), -1))
        )
    elif fault == 3:  # more elements than int64 counts
        tensor.shape[:] = [2**40, 2**40, *draw(st.lists(st.integers(1, 3), max_size=2))]
    elif fault == 4:  # a payload that disagrees with the shape
        size = len(tensor.data)
        tensor.data = draw(st.binary(max_size=64).filter(lambda b: len(b) != size))
    elif fault == 5:  # bool bytes other than 0 and 1
        count = draw(st.integers(1, 6))
        tensor.dtype, tensor.shape[:] = pb.DTYPE_BOOL, [count]
        tensor.data = draw(st.binary(min_size=count, max_size=count).filter(lambda b: max(b) > 1))
    elif fault == 6:  # more dimensions than an array has
        tensor.shape[:], tensor.data = (
            [1] * draw(st.integers(65, 100)),
            bytes(NUMPY_BY_WIRE[tensor.dtype].itemsize),
        )
    else:  # an empty tensor whose other dimensions overflow: no array has that shape
        tensor.shape[:] = [
            0,
            *draw(st.sampled_from([[2**62, 2**62], [2**63 - 1, 2], [2**40, 2**40, 2**40]])),
        ]
        tensor.data = b""
    return Hostile(tensor, True)


@st.composite
def any_tensor(draw: st.DrawFn) -> Hostile:
    """Fields drawn independently: valid or not, nobody knows beforehand."""
    dtype = draw(st.sampled_from(WIRE_DTYPES) | st.integers(-(2**31), 2**31 - 1))
    shape = draw(st.lists(dims, max_size=5))
    data = draw(st.binary(max_size=48))
    return Hostile(pb.Tensor(dtype=dtype, shape=shape, data=data), False)


floating = [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_INT64]
tensors = st.one_of(good_tensor(), good_tensor(floating), bad_tensor(), any_tensor())


def _value(kind: str, payload: Any) -> pb.Value:
    value = pb.Value()
    if kind == "tensor":
        value.tensor.CopyFrom(payload)
    elif kind == "list_value":
        value.list_value.SetInParent()
        value.list_value.values.extend(payload)
    elif kind != "empty":
        setattr(value, kind, payload)
    return value


leaf_values = st.one_of(
    tensors.map(lambda h: Hostile(_value("tensor", h.message), h.bad)),
    st.booleans().map(lambda b: Hostile(_value("bool_value", b), False)),
    (SMALL_INTS | HUGE_INTS).map(lambda i: Hostile(_value("int_value", i), False)),
    FLOATS.map(lambda f: Hostile(_value("float_value", f), False)),
    names.map(lambda s: Hostile(_value("string_value", s), False)),
    st.just(Hostile(_value("none_value", True), False)),
    st.just(Hostile(_value("empty", None), True)),  # no kind set
)
values = st.recursive(
    leaf_values,
    lambda inner: st.lists(inner, max_size=4).map(
        lambda items: Hostile(
            _value("list_value", [h.message for h in items]), any(h.bad for h in items)
        )
    ),
    max_leaves=6,
)
kwarg_names = st.one_of(
    st.sampled_from(
        [
            "dim",
            "keepdim",
            "dtype",
            "out",
            "p",
            "n",
            "k",
            "input",
            "other",
            "weight",
            "bias",
            "reduction",
            "inplace",
            "equation",
            "min",
            "max",
            "kernel_size",
            "stride",
            "",
            "self",
        ]
    ),
    names,
)
models = st.sampled_from(sorted(MODELS)) | names
functions = st.one_of(
    st.sampled_from(FUNCTION_NAMES),
    st.sampled_from(
        [
            "matmul_",
            "torch.matmul",
            "linalg",
            "__import__",
            "eval",
            "os.system",
            "load",
            "save",
            "zeros",
            "manual_seed",
            "add_",
            "nn.functional.dropout",
        ]
    ),
    names,
)


def model_inputs(model: str) -> st.SearchStrategy[list[tuple[str, Hostile]]]:
    """Named inputs: sometimes exactly what ``model`` takes, else anything."""
    fitting: dict[str, st.SearchStrategy[list[tuple[str, Hostile]]]] = {
        "mlp": st.tuples(st.just(""), good_tensor([pb.DTYPE_FLOAT32], 2)).map(lambda p: [p]),
        "two_heads": st.tuples(
            st.tuples(st.just("x"), good_tensor([pb.DTYPE_FLOAT64], 1)),
            st.tuples(st.just("y"), good_tensor([pb.DTYPE_FLOAT64], 1)),
        ).map(list),
    }
    anything = st.lists(st.tuples(names, tensors), max_size=4)
    return fitting.get(model, anything) | anything


@st.composite
def hostile_infer(draw: st.DrawFn) -> tuple[pb.InferRequest, bool]:
    model = draw(models)
    inputs = draw(model_inputs(model))
    outputs = draw(st.lists(names, max_size=2))
    message = pb.InferRequest(
        model=model,
        inputs=[pb.NamedTensor(name=n, tensor=h.message) for n, h in inputs],
        outputs=outputs,
    )
    return message, model not in MODELS or any(h.bad for _, h in inputs)


@st.composite
def hostile_call(draw: st.DrawFn) -> tuple[pb.CallRequest, bool]:
    function = draw(functions)
    args = draw(st.lists(values, max_size=4))
    kwargs = draw(st.dictionaries(kwarg_names, values, max_size=3))
    message = pb.CallRequest(function=function, args=[h.message for h in args])
    for name, h in kwargs.items():
        message.kwargs[name].CopyFrom(h.message)
    bad = (
        function not in FUNCTIONS
        or any(h.bad for h in [*args, *kwargs.values()])
        or "out" in kwargs
        or (
            kwargs.get("dtype") is not None
            and kwargs["dtype"].message.WhichOneof("kind") == "string_value"
            and kwargs["dtype"].message.string_value not in WIRE_BY_NAME
        )
    )
    return message, bad


@st.composite
def hostile_grad(draw: st.DrawFn) -> tuple[pb.GradRequest, bool]:
    grad_outputs = draw(st.lists(st.tuples(names, tensors), max_size=2))
    message = pb.GradRequest(
        grad_outputs=[pb.NamedTensor(name=n, tensor=h.message) for n, h in grad_outputs],
        param_grads=draw(st.booleans()),
    )
    bad = any(h.bad for _, h in grad_outputs)
    if draw(st.booleans()):
        call_message, call_bad = draw(hostile_call())
        message.function = call_message.function
        message.args.extend(call_message.args)
        for name, value in call_message.kwargs.items():
            message.kwargs[name].CopyFrom(value)
        # Inputs are named by position, so names mostly from those, in any order.
        wrt = draw(st.lists(st.sampled_from(["0", "1", "2"]) | names, max_size=3))
        # A name that is no position is never an input.
        bad |= call_bad or message.param_grads or any(not w.isdecimal() for w in wrt)
    else:
        infer_message, infer_bad = draw(hostile_infer())
        if infer_message.model or draw(st.booleans()):
            message.model = infer_message.model
        message.inputs.extend(infer_message.inputs)
        given = {nt.name for nt in infer_message.inputs}
        known = MODEL_INPUTS.get(infer_message.model, given)
        wrt = draw(st.lists(st.sampled_from(sorted(known) or [""]) | names, max_size=3))
        bad |= infer_bad or any(w not in known for w in wrt)
    message.wrt.extend(wrt)
    bad |= len(set(wrt)) < len(wrt)  # a name twice
    return message, bad


hostile = st.one_of(
    hostile_infer().map(lambda m: ("Infer", *m)),
    hostile_grad().map(lambda m: ("Grad", *m)),
    hostile_call().map(lambda m: ("Call", *m)),
)


# ------------------------------------------------------------------ (d) malformed streams

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


# ------------------------------------------------------------------ found


def _tensor(shape: list[int], data: bytes = b"", dtype: int = pb.DTYPE_UINT8) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


def _identity(tensor: pb.Tensor) -> bytes:
    inputs = [pb.NamedTensor(tensor=tensor)]
    return pb.InferRequest(model="identity", inputs=inputs).SerializeToString()


def _echo(count: int, repeat_last: bool = False) -> bytes:
    names = [f"n{i}" for i in range(count)] + ([f"n{count - 1}"] if repeat_last else [])
    inputs = [pb.NamedTensor(name=n, tensor=_tensor([0])) for n in names]
    return pb.InferRequest(model="echo", inputs=inputs).SerializeToString()


def _call(function: str, *args: pb.Value, **kwargs: pb.Value) -> bytes:
    message = pb.CallRequest(function=function, args=args, kwargs=kwargs)
    return message.SerializeToString(deterministic=True)


_X = pb.Value(tensor=_tensor([1, 3, 4], bytes(48), pb.DTYPE_FLOAT32))
_EYE = pb.Value(tensor=_tensor([2, 2], np.eye(2).tobytes(), pb.DTYPE_FLOAT64))
# What this suite found, each once more: (method, request, status, what the message says).
FOUND = [
    # A shape NumPy cannot make was a ValueError deep in the decoder: INTERNAL.
    ("Infer", _identity(_tensor([1] * 65, b"\0")), "INVALID_ARGUMENT", "65 dimensions"),
    ("Infer", _identity(_tensor([0, 2**62, 2**62])), "INVALID_ARGUMENT", "too large"),
    (
        "Call",
        _call("sum", pb.Value(tensor=_tensor([0, 2**63 - 1, 2]))),
        "INVALID_ARGUMENT",
        "too large",
    ),
    # torch ran for hours on these, or crashed the process, instead of refusing them.
    (
        "Call",
        _call("nn.functional.max_pool1d", _X, pb.Value(int_value=2**32)),
        "INVALID_ARGUMENT",
        "kernel_size",
    ),
    (
        "Call",
        _call("nn.functional.max_pool1d", _X, kernel_size=pb.Value(int_value=2**63 - 1)),
        "INVALID_ARGUMENT",
        "kernel_size",
    ),
    (
        "Call",
        _call("linalg.matrix_power", _EYE, pb.Value(int_value=-(2**63))),
        "INVALID_ARGUMENT",
        "greater than",
    ),
    # A name twice in wrt was a ValueError in the engine: INTERNAL.
    (
        "Grad",
        pb.GradRequest(
            model="identity",
            inputs=[pb.NamedTensor(tensor=_tensor([2], bytes(16), pb.DTYPE_FLOAT64))],
            wrt=["input", "input"],
            grad_outputs=[pb.NamedTensor(tensor=_tensor([2], bytes(16), pb.DTYPE_FLOAT64))],
        ).SerializeToString(),
        "INVALID_ARGUMENT",
        "more than once",
    ),
    # Duplicate names were looked for in quadratic time, holding the GIL: 30 000
    # inputs stalled the whole server for 10 s, 40 000 for 18 (past CALL_TIMEOUT).
    ("Infer", _echo(40_000, repeat_last=True), "INVALID_ARGUMENT", "given more than once"),
    ("Infer", _echo(40_000), "OK", ""),
    # Client-supplied names and lists of them were quoted whole: past 8 KiB the status
    # did not fit gRPC's metadata, and the client got RESOURCE_EXHAUSTED ("metadata size
    # exceeds limit") instead of the error.
    ("Infer", pb.InferRequest(model="m" * 100_000).SerializeToString(), "NOT_FOUND", "characters"),
    ("Call", _call("sum", **{"k" * 100_000: pb.Value()}), "INVALID_ARGUMENT", "empty value"),
    (
        "Grad",
        pb.GradRequest(
            model="echo", inputs=pb.InferRequest.FromString(_echo(20_000)).inputs, wrt=["zzz"]
        ).SerializeToString(),
        "INVALID_ARGUMENT",
        "in all",
    ),
]
