"""Valid requests, which the server answers OK: the seeds of mutation, as bytes and as
streams, and stream headers that declare a tensor of any shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

from support.fuzz.service import METHODS, STREAMS, TWIN
from support.fuzz.wire import part, to_stream
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec


def infer(
    model: str, *inputs: tuple[str, np.ndarray], outputs: Sequence[str] = ()
) -> codec.Encoder[Any]:
    encoder = codec.Encoder(pb.InferRequest(model=model, outputs=outputs))
    for name, arr in inputs:
        encoder.named(encoder.message.inputs.add(), name, arr)
    return encoder


def grad(
    model: str,
    *inputs: tuple[str, np.ndarray],
    wrt: Sequence[str] = (),
    grad_outputs: Sequence[tuple[str, np.ndarray]] = (),
    param_grads: bool = False,
) -> codec.Encoder[Any]:
    encoder = codec.Encoder(pb.GradRequest(model=model, wrt=wrt, param_grads=param_grads))
    for name, arr in inputs:
        encoder.named(encoder.message.inputs.add(), name, arr)
    for name, arr in grad_outputs:
        encoder.named(encoder.message.grad_outputs.add(), name, arr)
    return encoder


def call(
    function: str, *args: Any, wrt: Sequence[str] | None = None, **kwargs: Any
) -> codec.Encoder[Any]:
    message: Message
    if wrt is None:
        message = pb.CallRequest(function=function)
    else:
        message = pb.GradRequest(function=function, wrt=wrt)
    encoder = codec.Encoder(message)
    for i, arg in enumerate(args):
        encoder.value(message.args.add(), arg, f"argument {i}")  # type: ignore[attr-defined]
    for name, arg in kwargs.items():
        encoder.value(message.kwargs[name], arg, name)  # type: ignore[attr-defined]
    return encoder


def put(arr: np.ndarray) -> codec.Encoder[Any]:
    encoder = codec.Encoder(pb.PutRequest())
    encoder.tensor(encoder.message.tensor, arr)
    return encoder


RNG = np.random.default_rng(0)
F32 = RNG.standard_normal((4, 16)).astype(np.float32)
F64 = RNG.standard_normal(5)
BIG = RNG.standard_normal((1100, 16)).astype(np.float32)  # past INLINE_LIMIT: spliced
# (method, request) pairs the server answers OK: the seeds of mutation and streams.
VALID: list[tuple[str, codec.Encoder[Any]]] = [
    ("Info", codec.Encoder(pb.InfoRequest())),
    ("Infer", infer("identity", ("", F32))),
    ("Infer", infer("identity", ("input", np.array([True, False, True])))),
    ("Infer", infer("identity", ("", np.arange(6, dtype=np.uint64).reshape(2, 3)))),
    ("Infer", infer("identity", ("", np.array(1.5 - 2j, np.complex128)))),
    ("Infer", infer("identity", ("", np.zeros((0, 3), np.int16)))),
    ("Infer", infer("echo", ("a", F64), ("b", np.arange(3, dtype=np.int8)))),
    ("Infer", infer("mlp", ("input", F32), outputs=["output"])),
    ("Infer", infer("mlp64", ("", F32.astype(np.float64)))),
    ("Infer", infer("two_heads", ("x", F64), ("y", F64))),
    ("Infer", infer("identity", ("", BIG))),
    ("Grad", grad("mlp", ("", F32), grad_outputs=[("output", np.ones((4, 4), np.float32))])),
    ("Grad", grad("quadratic", ("x", F64), param_grads=True)),
    ("Grad", grad("two_heads", ("x", F64), ("y", F64), wrt=["x"], grad_outputs=[("sum", F64)])),
    ("Grad", grad("mlp", ("", BIG), grad_outputs=[("", np.ones((1100, 4), np.float32))])),
    ("Grad", call("dot", F64, F64, wrt=["0", "1"])),
    ("Grad", call("sum", F32, wrt=[])),
    ("Call", call("matmul", F32, F32.T)),
    ("Call", call("softmax", F32, dim=1)),
    ("Call", call("einsum", "ij,kj->ik", F32, F32)),
    ("Call", call("cat", [F32, F32], dim=0)),
    ("Call", call("sum", F32, dim=[0], keepdim=True, dtype="float64")),
    ("Call", call("clamp", F64, min=None, max=0.5)),
    ("Call", call("linalg.svd", F32)),
    ("Call", call("nn.functional.pad", F32, [1, 2], value=float("nan"))),
    ("Call", call("fft.rfft", BIG)),
    ("Put", put(F32)),
    ("Put", put(BIG)),
]
# Serialized with map entries in a fixed order (protobuf's own order varies from process
# to process), so that mutations, and the whole run, are the same every time.
VALID_BYTES = [
    (name, METHODS[name].request.FromString(e.finish()).SerializeToString(deterministic=True))
    for name, e in VALID
]
# The same requests streamed, by their index in VALID_BYTES: small payloads in 97-byte
# chunks, large ones in a dozen or so.
VALID_STREAMS = {
    i: (
        TWIN[name],
        to_stream(raw, METHODS[name].request.DESCRIPTOR, 97 if len(raw) < 4096 else 6007),
    )
    for i, (name, raw) in enumerate(VALID_BYTES)
    if name in TWIN
}
# Streams to start malformed ones from, by method: the valid ones, or for a method with
# none that answers OK without server state (GetStream needs a handle), a bare header.
SEEDS = {
    name: [p for n, p in VALID_STREAMS.values() if n == name] or [[part(1, b"")]]
    for name in STREAMS
}


def stream_header(name: str, shape: list[int], dtype: int = pb.DTYPE_UINT8) -> bytes:
    """A stream header declaring one tensor of ``shape``, for the request of ``name``."""
    tensor = pb.Tensor(dtype=dtype, shape=shape)  # type: ignore[arg-type]
    message: Message
    if name == "InferStream":
        message = pb.InferRequest(model="identity", inputs=[pb.NamedTensor(tensor=tensor)])
    elif name == "GradStream":
        message = pb.GradRequest(function="sum", args=[pb.Value(tensor=tensor)])
    elif name == "PutStream":
        message = pb.PutRequest(tensor=tensor)
    else:
        message = pb.CallRequest(function="sum", args=[pb.Value(tensor=tensor)])
    return part(1, message.SerializeToString())
