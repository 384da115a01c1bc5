"""On a GPU: placement, the pinned-memory paths (streamed uploads staged to the device
as they arrive, results copied back into pinned memory), and results equal to the
CPU's."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from conftest import start
from support.arrays import sample
from support.raw_streams import chunk_part, header_part, wait_for

from tensorwire import Client
from tensorwire._transport.methods import method_path
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec, streaming
from tensorwire.wire.dtypes import NAMES, NUMPY_BY_WIRE
from tensorwire.wire.protocol import CHANNEL_OPTIONS
from tensorwire_server.device.staging import COPY_BATCH, CudaStager
from tensorwire_server.device.tensors import resolve_device, to_device, to_numpy
from tensorwire_server.limits import Limits
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_address() -> Iterator[str]:
    yield from start(Settings(port=0, device="cuda"))


def test_auto_picks_cuda_and_info_reports_the_gpu(gpu_address: str) -> None:
    assert resolve_device("auto").type == "cuda"
    with Client(gpu_address) as c:
        device = c.info().device
    assert device.name == "cuda:0"
    assert device.description == torch.cuda.get_device_name(0)
    assert 0 < device.free_memory_bytes <= device.total_memory_bytes


def test_inputs_go_to_the_gpu_through_pinned_memory() -> None:
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    t = to_device(x, torch.device("cuda:0"))
    assert t.is_cuda
    np.testing.assert_array_equal(to_numpy(t, "t"), x)


@pytest.mark.parametrize("name", ["mlp", "mlp64"])
def test_gpu_results_equal_cpu_results(gpu_address: str, address: str, name: str) -> None:
    dtype = np.float32 if name == "mlp" else np.float64
    x = np.random.default_rng(1).standard_normal((256, 16)).astype(dtype)
    v = np.ones((256, 4), dtype)
    with Client(gpu_address) as gpu, Client(address) as cpu:
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(
            gpu.infer(name, x)["output"], cpu.infer(name, x)["output"], rtol=tol, atol=tol
        )
        g, c = (
            gpu.grad(name, x, grad_outputs=v, param_grads=True),
            cpu.grad(name, x, grad_outputs=v, param_grads=True),
        )
        np.testing.assert_allclose(g.grads["input"], c.grads["input"], rtol=tol, atol=tol)
        for k in c.param_grads:
            np.testing.assert_allclose(g.param_grads[k], c.param_grads[k], rtol=1e-4, atol=1e-4)
        a = np.random.default_rng(2).standard_normal((128, 128))
        np.testing.assert_allclose(gpu.call("linalg.inv", a), cpu.call("linalg.inv", a), rtol=1e-8)


def test_every_dtype_roundtrips_on_the_gpu(gpu_address: str) -> None:
    with Client(gpu_address) as c:
        for dtype in NUMPY_BY_WIRE.values():
            arr = sample(dtype, (33, 7))
            assert c.infer("identity", arr)["output"].tobytes() == arr.tobytes()


def test_gpu_out_of_memory_is_resource_exhausted_and_serving_continues(gpu_address: str) -> None:
    from tensorwire import ResourceExhaustedError

    with Client(gpu_address) as c:
        free = c.info().device.free_memory_bytes
        with pytest.raises(ResourceExhaustedError, match="out of cuda memory"):
            c.call(
                "kron",
                np.ones((1 << 16, 1), np.float32),
                np.ones((1, max(free >> 17, 1)), np.float32),
            )
        assert c.infer("identity", np.ones(3))["output"].tolist() == [1, 1, 1]


# ---------------------------------------------------------------- pinned staging


@pytest.mark.parametrize("pinned_limit", [0, 1 << 30], ids=["pageable", "pinned"])
def test_streamed_payloads_are_on_the_device_when_the_stream_ends(pinned_limit: int) -> None:
    """Chunks land in (pinned) host buffers that are copied to the device as they
    fill; the request then uses those device buffers, with no further copy."""
    device = torch.device("cuda:0")
    rng = np.random.default_rng(3)
    inputs = {
        "big": rng.standard_normal((3 * COPY_BATCH // 4 + 17,)).astype(np.float32),
        "small": sample(np.dtype(np.int8), (5, 3)),
        "empty": np.zeros((0, 4), np.float64),
    }
    encoder = codec.Encoder(pb.InferRequest(model="echo"))
    for name, arr in inputs.items():
        encoder.named(encoder.message.inputs.add(), name, arr)
    stager = CudaStager(device, Limits.from_settings(Settings()), pinned_limit)
    receiver = streaming.StreamReceiver(pb.InferRequest, stager.allocate, landed=stager.landed)
    for raw in streaming.parts(encoder, (1 << 20) + 3):
        receiver.feed(raw)
    request = receiver.finish()
    try:
        assert [h.is_pinned() for h in stager._hosts] == [pinned_limit > 0] * 3
        with stager.using():
            named = request.named(request.message.inputs, "input")
            for (name, arr), on_device in zip(named, stager._devices, strict=True):
                tensor = to_device(arr, device)
                assert tensor.is_cuda and tensor.shape == inputs[name].shape
                if arr.nbytes:
                    assert tensor.data_ptr() == on_device.data_ptr()  # no second copy
                assert to_numpy(tensor, name).tobytes() == inputs[name].tobytes()
    finally:
        receiver.close()
        stager.close()


def test_results_come_back_through_pinned_memory() -> None:
    on_device = torch.arange(1000, dtype=torch.float32, device="cuda:0").reshape(10, 100)
    out = to_numpy(on_device.t(), "out")  # strided, too
    assert torch.from_numpy(out).is_pinned()
    np.testing.assert_array_equal(out, np.arange(1000, dtype=np.float32).reshape(10, 100).T)


@pytest.fixture(scope="module")
def gpu_small_chunks() -> Iterator[str]:
    yield from start(Settings(port=0, device="cuda", chunk_size=7))


@pytest.mark.parametrize("dtype", list(NUMPY_BY_WIRE.values()), ids=NAMES)
def test_every_dtype_streams_to_the_gpu_and_back_bit_exact(
    gpu_small_chunks: str, dtype: np.dtype
) -> None:
    with Client(gpu_small_chunks, stream_threshold=0, chunk_size=5) as c:
        for shape in [(), (0,), (13,), (5, 3)]:
            arr = sample(dtype, shape)
            out = c.infer("identity", arr)["output"]
            assert out.dtype == dtype and out.tobytes() == arr.tobytes()


def test_a_large_streamed_request_round_trips_through_the_gpu(gpu_address: str) -> None:
    # Over the pinned limit and many copy batches: the pageable path, in full.
    x = np.random.default_rng(4).integers(0, 255, (300 << 20,), dtype=np.uint8)
    with Client(gpu_address, timeout=120) as c:
        out = c.infer("identity", x)["output"]
    assert np.array_equal(out, x)


@pytest.mark.parametrize("how", ["cancelled", "truncated"])
def test_a_cut_upload_to_the_gpu_frees_its_device_memory(gpu_address: str, how: str) -> None:
    with Client(gpu_address) as c:  # warm the streaming path up first
        c.infer("identity", np.ones(4 << 20, np.uint8))
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    release = threading.Event()
    chunk = chunk_part(bytes(1 << 20))

    def upload() -> Iterator[bytes]:
        yield header_part(128 << 20)
        for _ in range(64):
            yield chunk
        if how == "cancelled":
            release.wait(30)

    with grpc.insecure_channel(gpu_address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(method_path("InferStream"))(upload(), timeout=60)
        if how == "cancelled":
            assert wait_for(lambda: torch.cuda.memory_allocated() >= baseline + (128 << 20))
            call.cancel()
            release.set()
        with pytest.raises(grpc.RpcError):
            list(call)
    assert wait_for(lambda: torch.cuda.memory_allocated() <= baseline)
    with Client(gpu_address) as c:
        assert c.infer("identity", np.arange(5))["output"].tolist() == [0, 1, 2, 3, 4]
