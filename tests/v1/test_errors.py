"""Each bad request gets its status and a message naming the culprit; serving goes on."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import start

from tensorwire import (
    Client,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TensorwireError,
    UnavailableError,
)
from tensorwire._transport.methods import method_path
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire_server.settings import Settings

X = np.ones((2, 16), np.float32)

CASES: list[tuple[str, Callable[[Client], Any], type[TensorwireError], str]] = [
    ("unknown model", lambda c: c.infer("nope", X), NotFoundError, "model 'nope' not found"),
    ("unknown function", lambda c: c.call("os.system", "ls"), NotFoundError, "'os.system'"),
    (
        "too many inputs",
        lambda c: c.infer("mlp", [X, X]),
        InvalidArgumentError,
        r"takes 1 input\(s\) \(input\), got 2",
    ),
    ("wrong name", lambda c: c.infer("mlp", {"x": X}), InvalidArgumentError, "no input 'x'"),
    (
        "missing input",
        lambda c: c.infer("two_heads", {"x": np.ones(2)}),
        InvalidArgumentError,
        "missing input\\(s\\) 'y'",
    ),
    (
        "wrong dtype",
        lambda c: c.infer("mlp", X.astype(np.float16)),
        InvalidArgumentError,
        "input 'input' has dtype float16 but model 'mlp' expects float32",
    ),
    (
        "wrong shape",
        lambda c: c.infer("mlp", np.ones((2, 15), np.float32)),
        InvalidArgumentError,
        r"input 'input' has shape \[2, 15\]",
    ),
    (
        "wrong rank",
        lambda c: c.infer("mlp", np.ones(16, np.float32)),
        InvalidArgumentError,
        r"input 'input' has shape \[16\]",
    ),
    (
        "grad on int",
        lambda c: c.grad("quadratic", np.arange(5)),
        FailedPreconditionError,
        "input 'x' has dtype int64",
    ),
    (
        "model raises",
        lambda c: c.infer("raises", X),
        InvalidArgumentError,
        "model 'raises' raised ValueError: this model refuses every input",
    ),
    (
        "function raises",
        lambda c: c.call("matmul", np.ones((2, 3)), np.ones((2, 3))),
        InvalidArgumentError,
        "function 'matmul' raised RuntimeError",
    ),
    (
        "out= refused",
        lambda c: c.call("add", X, X, out=X),
        InvalidArgumentError,
        "argument 'out' is not allowed",
    ),
    (
        "bad kwarg",
        lambda c: c.call("softmax", X, dimm=1),
        InvalidArgumentError,
        "function 'softmax' raised TypeError",
    ),
    (
        "out of memory",
        lambda c: c.infer("hog", X),
        ResourceExhaustedError,
        "model 'hog' ran out of cpu memory",
    ),
]


@pytest.mark.parametrize(("what", "bad", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status_and_serving_continues(
    client: Client, what: str, bad: Callable[[Client], Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        bad(client)
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.__cause__.code().name == error.code
    np.testing.assert_array_equal(client.infer("identity", X)["output"], X)


def raw_call(address: str, method: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method_path(method))
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    return info.value


def infer_request(dtype: int, shape: list[int], data: bytes) -> bytes:
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]
    return pb.InferRequest(model="mlp", inputs=[pb.NamedTensor(tensor=tensor)]).SerializeToString()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (
            infer_request(pb.DTYPE_FLOAT32, [2, 16], b"\0" * 4),
            r"input 0: payload has 4 bytes but float32 \[2, 16\] needs 128",
        ),
        (infer_request(99, [1], b"\0"), "input 0: unknown dtype 99"),
        (infer_request(pb.DTYPE_FLOAT32, [2, -16], b""), "input 0: negative dimension"),
        (b"\x12\xff\xff\x03garbage", "malformed InferRequest"),
    ],
    ids=["short-payload", "unknown-dtype", "negative-dim", "garbage"],
)
def test_malformed_wire_messages_are_invalid_argument(
    address: str, client: Client, payload: bytes, match: str
) -> None:
    error = raw_call(address, "Infer", payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, error.details()), error.details()
    assert client.info().models


def test_client_mistakes_are_not_logged_as_errors(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        for _, bad, error, _ in CASES:
            with pytest.raises(error):
                bad(client)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_server_bug_is_internal_generic_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(port=0, device="cpu", models={"broken": "support.toy_models:broken_info"})
    for address in start(settings):
        with Client(address) as c, caplog.at_level(logging.INFO):
            with pytest.raises(InternalError, match="internal server error") as info:
                c.info()
            assert "a server-side bug" not in str(info.value)
            np.testing.assert_array_equal(c.infer("broken", X)["output"], X)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info and "a server-side bug" in str(errors[0].exc_info[1])


def test_unreachable_server_names_the_target() -> None:
    with (
        Client("127.0.0.1:1", timeout=2) as c,
        pytest.raises(UnavailableError, match=r"127\.0\.0\.1:1"),
    ):
        c.info()


def test_status_messages_are_clipped_to_travel() -> None:
    from tensorwire_server.transport.rpc import clip

    assert clip("short") == "short"
    long = "é" * 5000  # 10 000 bytes of UTF-8
    clipped = clip(long)
    assert len(clipped.encode()) < 2100 and clipped.endswith("... (5000 characters)")


def test_grpc_aio_failing_its_own_send_is_unavailable_not_a_server_bug() -> None:
    # grpc.aio reports a batch operation that failed in its own core (the server's
    # process died under a call) as INTERNAL "Internal error from Core"; no server
    # said that, so the client reads it as the connection breaking.
    from tensorwire._transport.status import status_code as _code
    from tensorwire._transport.status import status_details as _details

    local = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "Internal error from Core",
        "send_message failed",
    )
    assert _code(local) is grpc.StatusCode.UNAVAILABLE
    assert "connection to the server broke" in _details(local)
    served = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "a server bug"
    )
    assert _code(served) is grpc.StatusCode.INTERNAL and _details(served) == "a server bug"
