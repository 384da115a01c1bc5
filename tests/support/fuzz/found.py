"""What the fuzz suite found, each pinned as a request, the status it must get and what
the message must say."""

from __future__ import annotations

import numpy as np

from tensorwire.v1 import tensorwire_pb2 as pb


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
