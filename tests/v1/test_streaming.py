"""The streaming path: every RPC that carries tensors, with a lowered threshold and tiny
odd chunks so that every boundary case shows up in small tensors; and streams that
are cut, short, overlong or malformed."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import TOY_MODELS, start
from support.arrays import sample
from support.raw_streams import chunk_part, header_part, rss, send_parts, wait_for
from support.servers import spawn_server

from tensorwire import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    OutOfRangeError,
    Progress,
    ResourceExhaustedError,
)
from tensorwire._messages import infer_request
from tensorwire._transport.methods import method_path
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec, framing, streaming
from tensorwire.wire.dtypes import NAMES, NUMPY_BY_WIRE
from tensorwire.wire.protocol import CHANNEL_OPTIONS
from tensorwire_server.settings import Settings

# Odd sizes that divide nothing: chunks split elements, tensors and small headers.
SERVER_CHUNK = 7
CLIENT_CHUNK = 5


@pytest.fixture(scope="module")
def small_chunks() -> Iterator[str]:
    """A server that streams its responses in 7-byte chunks, its limits lifted so that
    the allocator itself meets absurd headers."""
    yield from start(
        Settings(
            host="127.0.0.1",
            port=0,
            device="cpu",
            models=TOY_MODELS,
            chunk_size=SERVER_CHUNK,
            max_request_bytes=2**62,
            max_tensor_elements=2**62,
        )
    )


@pytest.fixture
def streamer(small_chunks: str) -> Iterator[Client]:
    """A client that streams every request in 5-byte chunks."""
    with Client(small_chunks, timeout=60, stream_threshold=0, chunk_size=CLIENT_CHUNK) as c:
        yield c


@pytest.mark.parametrize("dtype", list(NUMPY_BY_WIRE.values()), ids=NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (13,), (5, 3), (1001,)])
def test_every_dtype_and_shape_streams_both_ways_bit_exact(
    streamer: Client, dtype: np.dtype, shape: tuple[int, ...]
) -> None:
    arr = sample(dtype, shape)
    out = streamer.infer("identity", arr)["output"]
    assert out.dtype == dtype and out.shape == shape
    assert out.tobytes() == arr.tobytes()
    assert out.flags.writeable and out.flags.owndata is False  # the stream's own buffer


def test_many_inputs_and_outputs_in_one_stream(streamer: Client) -> None:
    rng = np.random.default_rng(1)
    dtypes = list(NUMPY_BY_WIRE.values())
    inputs = {f"t{i}": sample(dtypes[i % len(dtypes)], (i % 4, 3)) for i in range(40)}
    inputs["big"] = rng.standard_normal((77, 31))
    out = streamer.infer("echo", inputs)
    assert list(out) == list(inputs)
    for name, arr in inputs.items():
        assert out[name].dtype == arr.dtype and out[name].tobytes() == arr.tobytes()


def test_grad_and_call_stream_and_agree_with_the_unary_path(
    streamer: Client, client: Client
) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 16))
    a = rng.standard_normal((6, 6)) + 6 * np.eye(6)

    def calls(c: Client) -> list[Any]:
        return [
            c.grad("mlp64", x, grad_outputs=np.ones((3, 4)), param_grads=True),
            c.call_grad("linalg.det", a),
            c.call("linalg.svd", a),
            c.call("einsum", "ij,jk->ik", a, a),
            c.call("cat", [x, x], dim=0),
        ]

    streamed, unary = calls(streamer), calls(client)
    assert repr(streamed) == repr(unary)


def test_sync_and_async_clients_stream_identical_results(small_chunks: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 16))
    big = rng.standard_normal((129, 65)).astype(np.float32)

    def calls(c: Any) -> list[Any]:
        return [
            c.infer("echo", {"x": x, "big": big}),
            c.grad("mlp64", x, grad_outputs=np.ones((5, 4))),
            c.call("linalg.qr", x),
        ]

    with Client(small_chunks, stream_threshold=0, chunk_size=CLIENT_CHUNK) as c:
        sync = calls(c)

    async def run() -> list[Any]:
        async with AsyncClient(small_chunks, stream_threshold=0, chunk_size=CLIENT_CHUNK) as ac:
            return list(await asyncio.gather(*calls(ac)))

    assert repr(asyncio.run(run())) == repr(sync)


def test_progress_reports_every_chunk_of_both_stages(streamer: Client) -> None:
    arr = np.arange(1000, dtype=np.float32)
    events: list[Progress] = []
    streamer.infer("identity", arr, progress=events.append)
    for stage in ("upload", "download"):
        done = [e.done for e in events if e.stage == stage]
        assert {e.total for e in events if e.stage == stage} == {arr.nbytes}
        assert done[0] == 0 and done[-1] == arr.nbytes and done == sorted(done)
    upload = [e.done for e in events if e.stage == "upload"]
    assert np.diff(upload)[:-1].tolist() == [CLIENT_CHUNK] * (len(upload) - 2)
    assert events[-1].fraction == 1.0


def test_small_calls_report_progress_at_start_and_end(client: Client) -> None:
    events: list[Progress] = []
    client.infer("identity", np.ones(10, np.float64), progress=events.append)
    assert events == [
        Progress("upload", 0, 80),
        Progress("upload", 80, 80),
        Progress("download", 0, 80),
        Progress("download", 80, 80),
    ]


class Stop(Exception):
    pass


@pytest.mark.parametrize("stage", ["upload", "download"])
def test_a_progress_callback_that_raises_ends_the_call_with_its_error(
    streamer: Client, stage: str
) -> None:
    def callback(p: Progress) -> None:
        if p.stage == stage and p.done > 100:
            raise Stop(stage)

    with pytest.raises(Stop, match=stage):
        streamer.infer("identity", np.ones(1000), progress=callback)
    assert streamer.infer("identity", np.ones(3))["output"].tolist() == [1, 1, 1]


async def _async_raise(address: str, stage: str) -> None:
    def callback(p: Progress) -> None:
        if p.stage == stage and p.done > 100:
            raise Stop(stage)

    async with AsyncClient(address, stream_threshold=0, chunk_size=CLIENT_CHUNK) as ac:
        with pytest.raises(Stop, match=stage):
            await ac.infer("identity", np.ones(1000), progress=callback)


@pytest.mark.parametrize("stage", ["upload", "download"])
def test_async_progress_callback_errors_surface_too(small_chunks: str, stage: str) -> None:
    asyncio.run(_async_raise(small_chunks, stage))


def test_a_response_too_large_for_one_message_is_fetched_as_a_stream() -> None:
    """The server refuses a unary response over its limit with OUT_OF_RANGE and the
    client asks again over the stream, whatever the size of the request."""
    settings = Settings(host="127.0.0.1", port=0, device="cpu", chunk_size=64)
    from tensorwire_server.server import TensorwireServer, build_engine

    server = TensorwireServer(settings, build_engine(settings))
    server.servicer.unary_limit = 1000  # "large" from 1000 payload bytes on
    port = server.port
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        x = np.arange(200, dtype=np.float64)  # 1600 bytes: small request, "large" response
        with Client(address, timeout=30) as c:
            np.testing.assert_array_equal(c.infer("identity", x)["output"], x)
            np.testing.assert_array_equal(c.infer("identity", x[:10])["output"], x[:10])

            async def run() -> np.ndarray:
                async with AsyncClient(address, timeout=30) as ac:
                    return await ac.call("mul", x, 2.0)  # type: ignore[return-value]

            np.testing.assert_array_equal(asyncio.run(run()), 2 * x)
            # A plain unary caller sees the status itself.
            raw = c._transport._methods["Infer"]
            encoder = infer_request("identity", x, None, 0, False)
            with pytest.raises(grpc.RpcError) as info:
                raw(encoder.finish(), timeout=30)
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE  # type: ignore[attr-defined]
            assert "InferStream" in info.value.details()  # type: ignore[attr-defined]
            assert issubclass(OutOfRangeError, InvalidArgumentError)
    finally:
        server.stop(None)


# ---------------------------------------------------------------- malformed streams


def _parts(model: str, arr: np.ndarray, chunk: int) -> list[bytes]:
    encoder = codec.Encoder(pb.InferRequest(model=model))
    encoder.named(encoder.message.inputs.add(), "", arr)
    return list(streaming.parts(encoder, chunk))


ARR = np.arange(100, dtype=np.int32)
GOOD = _parts("identity", ARR, 64)
HEADER, CHUNKS = GOOD[0], GOOD[1:]
CASES = {
    "empty": ([], r"ended before its header"),
    "chunk first": ([chunk_part(b"abc"), HEADER], r"chunk came before the header"),
    "two headers": ([HEADER, HEADER], r"a second header"),
    "truncated": ([HEADER, *CHUNKS[:-1]], r"truncated stream: it ended after 384 of the 400"),
    "overlong": ([*GOOD, chunk_part(b"x")], r"overlong stream: .* 400 payload bytes"),
    "inline data": (
        [
            pb.InferRequestPart(
                header=pb.InferRequest(
                    model="identity",
                    inputs=[
                        pb.NamedTensor(
                            tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1], data=b"\x01")
                        )
                    ],
                )
            ).SerializeToString()
        ],
        r"inline data",
    ),
    "bad dtype": (
        [
            pb.InferRequestPart(
                header=pb.InferRequest(
                    model="identity", inputs=[pb.NamedTensor(name="x", tensor=pb.Tensor(shape=[2]))]
                )
            ).SerializeToString()
        ],
        r"inputs 'x': no dtype given",
    ),
    "neither": ([b""], r"neither header nor chunk"),
    "garbage": ([b"\xff\xff\xff"], r"malformed .*varint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_streams_get_invalid_argument_naming_the_fault(
    small_chunks: str, case: str
) -> None:
    parts, message = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        send_parts(small_chunks, parts)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert re.search(message, info.value.details()), info.value.details()  # type: ignore[attr-defined]
    # The server goes on serving.
    assert len(send_parts(small_chunks, GOOD)) > 1


def test_a_header_declaring_more_memory_than_exists_is_resource_exhausted(
    small_chunks: str,
) -> None:
    header = pb.InferRequestPart(
        header=pb.InferRequest(
            model="identity",
            inputs=[pb.NamedTensor(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2**50]))],
        )
    ).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        send_parts(small_chunks, [header])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "cannot allocate" in info.value.details()  # type: ignore[attr-defined]


def test_a_malformed_response_stream_is_refused_by_the_client() -> None:
    receiver = streaming.StreamReceiver(pb.InferResponse)
    with pytest.raises(InvalidArgumentError, match="chunk came before"):
        receiver.feed(pb.InferResponsePart(chunk=b"1").SerializeToString())
    with pytest.raises(ResourceExhaustedError):
        streaming.allocate_host(np.dtype(np.float64), (2**50,), "x")


def test_stream_header_order_follows_the_serialized_header() -> None:
    """kwargs is a map, whose order on the wire is the serializer's choice: chunks
    follow the header's own order, whatever order the encoder queued tensors in."""
    encoder = codec.Encoder(pb.CallRequest(function="f"))
    arrays = {k: np.full(3, i, np.int8) for i, k in enumerate("zyxwv")}
    for key, arr in arrays.items():
        encoder.value(encoder.message.kwargs[key], arr, key)
    receiver = streaming.StreamReceiver(pb.CallRequest)
    for raw in streaming.parts(encoder, 4):
        receiver.feed(raw)
    received = receiver.finish()
    _, kwargs = received.arguments(received.message.args, received.message.kwargs)
    assert {k: v.tolist() for k, v in kwargs.items()} == {  # type: ignore[union-attr]
        k: v.tolist() for k, v in arrays.items()
    }
    assert pb.InferRequestPart.DESCRIPTOR.fields_by_name["header"].number == framing.PART_HEADER


def test_landed_names_each_allocation_and_covers_it_in_ascending_ranges() -> None:
    """What a device stager relies on: ``landed(k, start, stop)`` speaks of the k-th
    array ``allocate`` returned, whatever order the stream carries them in, and the
    ranges of each tile it from 0 to its end in order."""
    encoder = codec.Encoder(pb.CallRequest(function="f"))
    arrays = {k: np.arange(i * 5 + 1, dtype=np.int16) for i, k in enumerate("zyxwv")}
    for key, arr in arrays.items():
        encoder.value(encoder.message.kwargs[key], arr, key)
    allocated: list[np.ndarray] = []
    covered: dict[int, int] = {}

    def allocate(dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
        allocated.append(np.empty(shape, dtype))
        return allocated[-1]

    def landed(k: int, start: int, stop: int) -> None:
        assert start == covered.get(k, 0) and stop <= allocated[k].nbytes
        covered[k] = stop
        # Every byte reported has been written: it already equals the sent array's.
        sent = next(a for a in arrays.values() if a.nbytes == allocated[k].nbytes)
        assert allocated[k].view(np.uint8)[:stop].tobytes() == sent.view(np.uint8)[:stop].tobytes()

    receiver = streaming.StreamReceiver(pb.CallRequest, allocate, landed=landed)
    for raw in streaming.parts(encoder, 3):
        receiver.feed(raw)
    receiver.finish()
    assert covered == {k: a.nbytes for k, a in enumerate(allocated)}


# ---------------------------------------------------------------- memory


DECLARED = 512 << 20
SENT = 256 << 20
MIB = bytes(1 << 20)


@pytest.mark.parametrize("how", ["cancelled", "truncated"])
def test_a_cut_upload_frees_what_the_server_allocated(how: str) -> None:
    """Half of a 512 MiB upload, then the client cancels (or half-closes early): the
    server answers (or drops) it and its memory returns to its baseline."""
    with spawn_server("--device", "cpu") as (proc, address, _):
        with Client(address, timeout=60) as c:  # warm the streaming path up first
            c.infer("identity", np.ones(4 << 20, np.uint8))
        baseline = rss(proc.pid)
        release = threading.Event()
        chunk = chunk_part(MIB)

        def upload() -> Iterator[bytes]:
            yield header_part(DECLARED)
            for _ in range(SENT >> 20):
                yield chunk
            if how == "cancelled":
                release.wait(30)

        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            call = channel.stream_stream(method_path("InferStream"))(upload(), timeout=60)
            if how == "cancelled":
                assert wait_for(lambda: rss(proc.pid) > baseline + SENT * 3 // 4)
                call.cancel()
                release.set()
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
                assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
            else:
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
                assert "truncated stream" in info.value.details()  # type: ignore[attr-defined]
        # Allocator slack, not the payload: far below the 256 MiB that had arrived.
        assert wait_for(lambda: rss(proc.pid) < baseline + (48 << 20)), (
            f"server RSS {rss(proc.pid) >> 20} MiB, baseline {baseline >> 20} MiB"
        )
        with Client(address, timeout=60) as c:
            assert c.infer("identity", np.arange(5))["output"].tolist() == [0, 1, 2, 3, 4]
