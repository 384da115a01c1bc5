"""The codec without a server: every dtype, layouts, framing, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from support.arrays import RNG, sample

from tensorwire import InvalidArgumentError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec
from tensorwire.wire.dtypes import NAMES, NUMPY_BY_WIRE


def roundtrip(arr: np.ndarray) -> np.ndarray:
    encoder = codec.Encoder(pb.InferRequest(model="m"))
    encoder.named(encoder.message.inputs.add(), "x", arr)
    raw = encoder.finish()
    # Anyone's protobuf parses what the splicing serializer writes.
    plain = pb.InferRequest.FromString(raw)
    assert plain.inputs[0].tensor.shape == list(arr.shape)
    received = codec.receive(pb.InferRequest, raw)
    [(name, out)] = received.named(received.message.inputs, "input")
    assert name == "x"
    return out


@pytest.mark.parametrize("dtype", list(NUMPY_BY_WIRE.values()), ids=NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (5, 3), (40_000,)])
def test_every_dtype_and_shape_roundtrips_bit_exact(
    dtype: np.dtype, shape: tuple[int, ...]
) -> None:
    arr = sample(dtype, shape)
    out = roundtrip(arr)
    assert out.dtype == dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::2, 1::3],  # strided view
        lambda a: np.asfortranarray(a),
        lambda a: a.astype(">f8"),  # big-endian
        lambda a: np.asfortranarray(a.astype(">f8"))[::-1],
    ],
    ids=["strided", "fortran", "big-endian", "fortran-big-endian-reversed"],
)
@pytest.mark.parametrize("rows", [6, 4000], ids=["inline", "spliced"])
def test_layouts_roundtrip_as_values(make, rows: int) -> None:  # type: ignore[no-untyped-def]
    arr = make(RNG.standard_normal((rows, 9)))
    out = roundtrip(arr)
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_large_payload_decodes_as_a_view_of_the_received_bytes() -> None:
    arr = RNG.standard_normal((512, 512))
    encoder = codec.Encoder(pb.InferRequest())
    encoder.named(encoder.message.inputs.add(), "x", arr)
    # An aligned C-contiguous little-endian array is queued without a copy.
    assert np.shares_memory(np.frombuffer(encoder._slots[0][1], np.uint8), arr)
    raw = encoder.finish()
    received = codec.receive(pb.InferRequest, raw)
    [(_, out)] = received.named(received.message.inputs, "input")
    assert np.shares_memory(out, np.frombuffer(raw, np.uint8))
    assert not out.flags.writeable


def test_nested_values_roundtrip() -> None:
    a, b = RNG.standard_normal((300, 30)), RNG.standard_normal(3)
    encoder = codec.Encoder(pb.CallRequest(function="f"))
    request = encoder.message
    args = [a, [b, 1, [2.5, None]], "ij,jk->ik", True]
    for i, arg in enumerate(args):
        encoder.value(request.args.add(), arg, str(i))
    encoder.value(request.kwargs["dim"], (0, -1), "dim")
    received = codec.receive(pb.CallRequest, encoder.finish())
    got, kwargs = received.arguments(received.message.args, received.message.kwargs)
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1][0], b)
    assert got[1][1:] == [1, [2.5, None]] and got[2:] == ["ij,jk->ik", True]
    assert kwargs == {"dim": [0, -1]}


def test_unsupported_argument_types_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="function"):
        codec.Encoder(pb.Value()).value(pb.Value(), print, "fn")
    with pytest.raises(InvalidArgumentError, match="cannot travel"):
        codec.Encoder(pb.Value()).tensor(pb.Tensor(), np.array(["a"]))


def tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (tensor(pb.DTYPE_FLOAT32, [2, 3], b"\0" * 20), "payload has 20 bytes but float32"),
        (tensor(pb.DTYPE_UNSPECIFIED, [1], b"\0"), "no dtype given"),
        (tensor(99, [1], b"\0"), "unknown dtype 99 is not supported"),
        (tensor(pb.DTYPE_INT8, [2, -1], b""), "negative dimension"),
        (tensor(pb.DTYPE_INT8, [2**62, 2**62], b""), "more than 2\\*\\*63-1 elements"),
        (tensor(pb.DTYPE_BOOL, [2], b"\x00\x07"), "other than 0 and 1"),
    ],
)
def test_malformed_tensors_are_refused_naming_the_input(message: pb.Tensor, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"input 'x': .*{match}"):
        codec.decode_array(message, message.data, "input 'x'")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12\xff\xff\xff\xff\x0f",  # a field longer than the message
        b"\x12\x05\x0a\x01",  # truncated nested message
        b"\x0b\x00",  # a group: wire type 3
        b"\xff" * 11,  # an overlong varint
    ],
)
def test_malformed_messages_are_refused(raw: bytes) -> None:
    padded = raw + b"\x1a\x00" * (codec.INLINE_LIMIT // 2)  # take the splicing path
    with pytest.raises(InvalidArgumentError, match="malformed"):
        codec.receive(pb.InferRequest, padded)
