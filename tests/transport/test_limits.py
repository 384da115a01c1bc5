"""Request limits: each breach answered with a clear status before memory is committed,
and the server goes on serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace

import grpc
import numpy as np
import pytest
from conftest import TOY_MODELS, start
from support.raw_streams import chunk_part, header_part, send_parts

from tensorwire import Client, ResourceExhaustedError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Received
from tensorwire_server.limits import Limits, _named_tensors
from tensorwire_server.settings import Settings


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    yield from start(
        Settings(
            port=0,
            device="cpu",
            models=TOY_MODELS,
            max_request_bytes=16 << 10,  # unary: gRPC refuses past this + 1 MiB
            max_tensor_elements=1000,
            max_concurrent_requests=3,
            max_stream_seconds=1.5,
        )
    )


def stream(address: str, parts: Iterator[bytes]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        send_parts(address, parts)
    return info.value


def test_a_unary_request_over_max_request_bytes_is_refused_by_grpc(limited: str) -> None:
    with Client(limited, stream_threshold=1 << 40) as c:
        with pytest.raises(ResourceExhaustedError):
            c.infer("echo", {f"t{i}": np.zeros(1000, np.complex128) for i in range(80)})
        assert c.infer("identity", np.arange(3))["output"].tolist() == [0, 1, 2]


def test_a_streamed_header_over_max_request_bytes_is_refused_before_allocation(
    limited: str,
) -> None:
    # 600 + 600 complex128 elements, 19 200 bytes: within the element limit, over a
    # byte limit of 16 KiB once the second tensor is declared. Refused from the header.
    header = pb.InferRequestPart(
        header=pb.InferRequest(
            model="echo",
            inputs=[
                pb.NamedTensor(name=n, tensor=pb.Tensor(dtype=pb.DTYPE_COMPLEX128, shape=[600]))
                for n in "ab"
            ],
        )
    ).SerializeToString()
    error = stream(limited, iter([header]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert error.details() == (  # type: ignore[attr-defined]
        "the request carries 19200 payload bytes, more than the server's max_request_bytes (16384)"
    )


def test_a_tensor_over_max_tensor_elements_is_refused_on_both_paths(limited: str) -> None:
    x = np.zeros(1001, np.uint8)
    for threshold in (1 << 40, 0):
        with Client(limited, stream_threshold=threshold) as c:
            with pytest.raises(ResourceExhaustedError, match="1001 elements, more than the"):
                c.infer("identity", x)
            assert c.infer("identity", x[:1000])["output"].shape == (1000,)


def test_requests_over_max_concurrent_requests_are_shed_at_once(limited: str) -> None:
    with Client(limited, timeout=30) as c, futures.ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(c.infer, "sleeper", np.float64(1.0)) for _ in range(6)]
        outcomes = [f.exception() for f in calls]
    shed = [e for e in outcomes if e is not None]
    assert 1 <= len(shed) <= 3 and all(isinstance(e, ResourceExhaustedError) for e in shed)
    with Client(limited) as c:
        assert c.infer("identity", np.arange(3))["output"].tolist() == [0, 1, 2]


def test_a_stream_that_takes_too_long_is_stopped(limited: str) -> None:
    def trickle() -> Iterator[bytes]:
        yield header_part(64)
        for _ in range(64):
            time.sleep(0.05)
            yield chunk_part(b"x")

    error = stream(limited, trickle())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert "max_stream_seconds (1.5 s)" in error.details()  # type: ignore[attr-defined]


def test_a_stalled_stream_is_cut_and_its_worker_freed(limited: str) -> None:
    release = threading.Event()

    def stall() -> Iterator[bytes]:
        yield header_part(64)
        release.wait(20)

    started = time.monotonic()
    error = stream(limited, stall())
    release.set()
    assert error.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    assert time.monotonic() - started < 10
    with Client(limited) as c:
        assert c.infer("identity", np.arange(3))["output"].tolist() == [0, 1, 2]


def test_a_call_without_deadline_that_queues_past_the_default_is_not_run() -> None:
    settings = Settings(port=0, device="cpu", models=TOY_MODELS, workers=1, default_deadline=0.5)
    for address in start(settings):
        with Client(address, timeout=None) as c, futures.ThreadPoolExecutor(2) as pool:
            busy = pool.submit(c.infer, "sleeper", np.float64(1.5))
            time.sleep(0.2)
            queued = pool.submit(c.infer, "sleeper", np.float64(0.0))
            assert float(busy.result()["output"]) == 1.5
            with pytest.raises(Exception, match="waited for a worker; it did not run"):
                queued.result()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_request_bytes must be positive"):
        Settings(max_request_bytes=0)
    with pytest.raises(ValueError, match="shutdown_grace must not be negative"):
        Settings(shutdown_grace=-1)


def _walked(limits: Limits, request: Received[pb.InferRequest]) -> int | str:
    """``Limits.received`` by ``tensors_in``'s generic walk (the path every message
    took before the InferRequest's own), or the message it refused with."""
    import tensorwire_server.limits as module

    saved = dict(module._NAMED_FIELD)
    module._NAMED_FIELD[request.message.DESCRIPTOR.full_name] = None
    try:
        return _outcome(limits, request)
    finally:
        module._NAMED_FIELD.clear()
        module._NAMED_FIELD.update(saved)


def _outcome(limits: Limits, request: Received[pb.InferRequest]) -> int | str:
    try:
        return limits.received(request)
    except ResourceExhaustedError as exc:
        return exc.message


def test_an_infer_requests_tensors_are_checked_as_the_generic_walk_checks_them() -> None:
    limits = Limits(max_request_bytes=1 << 20, max_tensor_elements=100, max_stream_seconds=1.0)
    limits = replace(limits, max_request_tensors=3)
    data = np.ones(4, np.float32).tobytes()

    def named(name: str, shape: list[int], with_tensor: bool = True) -> pb.NamedTensor:
        if not with_tensor:
            return pb.NamedTensor(name=name)
        return pb.NamedTensor(name=name, tensor=pb.Tensor(dtype=1, shape=shape, data=data))

    cases = [
        [],
        [named("x", [1, 4])],
        [named("", [2, 2]), named("", [4])],
        [named("x", [1, 4]), named("big", [11, 10])],  # over max_tensor_elements, named
        [named("", [101])],  # over it, by position
        [named("", [-5, 3]), named("", [0, 1 << 40])],
        [named("a", [1]), named("b", [], False), named("c", [1]), named("d", [1])],
        [named(str(i), [1]) for i in range(4)],  # over max_request_tensors
        [named("", [1], False), named("é\n", [200])],
    ]
    for inputs in cases:
        request = Received(pb.InferRequest(model="m", inputs=inputs, outputs=["y"]))
        assert _named_tensors(request.message.DESCRIPTOR) == "inputs"
        assert _outcome(limits, request) == _walked(limits, request)
    refused = Received(pb.InferRequest(model="m", inputs=[named("big", [11, 10])]))
    assert "inputs 'big': 110 elements" in str(_outcome(limits, refused))
    # Messages of any other shape are walked.
    assert _named_tensors(pb.GradRequest.DESCRIPTOR) is None
    assert _named_tensors(pb.CallRequest.DESCRIPTOR) is None
