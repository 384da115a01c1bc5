"""On a GPU: probes for the defects a CUDA review found in code no GPU had run (issue
34), each of which gives wrong bytes or takes the server down on a real device. A
delayed producer (torch.cuda._sleep holds a stream for a number of GPU cycles) makes
a missing order between two streams show as wrong bytes instead of luck."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from conftest import start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.arrays import sample
from support.raw_streams import wait_for
from support.servers import spawn_server
from support.toy_models import SlowDouble

from tensorwire import Client, InternalError, ResourceExhaustedError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec, streaming
from tensorwire_server.device.faults import selected
from tensorwire_server.device.staging import CudaStager
from tensorwire_server.device.tensors import to_device
from tensorwire_server.engine.engine import Engine
from tensorwire_server.engine.functions import FUNCTIONS, Function
from tensorwire_server.limits import Limits
from tensorwire_server.models.config import ModelConfig
from tensorwire_server.models.model import IOSpec, Model
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.cuda

#: About a tenth of a second of a GPU's clock: far longer than any copy probed here,
#: so a read not ordered after the producer runs first and sees the old bytes.
CYCLES = 1 << 28
DEVICE = torch.device("cuda:0")
LIMITS = Limits.from_settings(Settings())


def two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


def engine_with(name: str, module: torch.nn.Module, **config: object) -> Engine:
    engine = Engine(DEVICE)
    model = Model(name, module, (IOSpec("input"),), (IOSpec("output"),))
    engine.serve(model, ModelConfig.of(model, **config))
    return engine


# ---------------------------------------------------------------- defect 1: streams


def test_a_model_reads_its_input_only_after_the_ambient_stream_wrote_it() -> None:
    engine = engine_with("double", SlowDouble(0))
    x = torch.zeros(1 << 20, device=DEVICE)
    torch.cuda.synchronize(DEVICE)
    torch.cuda._sleep(CYCLES)  # the ambient (default) stream is busy ...
    x.fill_(3.0)  # ... so the input is written only after it
    out = engine.infer("double", [("input", x)]).outputs[0][1]
    assert np.all(out == 6.0), np.unique(out)


def test_an_output_kept_on_the_device_is_read_only_after_the_model_wrote_it() -> None:
    engine = engine_with("slow", SlowDouble(CYCLES))
    x = torch.full((1 << 20,), 2.0, device=DEVICE)
    torch.cuda.synchronize(DEVICE)
    kept = engine.infer("slow", [("input", x)], export=lambda _, t: t).outputs[0][1]
    assert isinstance(kept, torch.Tensor) and kept.is_cuda
    # Read on the ambient stream, as a session's Get or a function would.
    assert bool((kept.cpu() == 4.0).all())


def test_concurrent_requests_on_two_instances_each_get_their_own_answer() -> None:
    engine = engine_with("slow", SlowDouble(CYCLES >> 4), instances=2)
    with engine.registry.using("slow") as served:
        streams = [instance.stream for instance in served.instances]
    assert len(streams) == 2 and streams[0].stream_id != streams[1].stream_id

    def ask(i: int) -> np.ndarray:
        x = np.full(1 << 16, i, np.float32)
        return engine.infer("slow", [("input", x)]).outputs[0][1]  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, out in enumerate(answers):
        assert np.all(out == 2.0 * i), (i, np.unique(out))


def test_two_instances_on_two_gpus_each_serve_and_take_gradients() -> None:
    two_gpus()
    engine = engine_with("double", SlowDouble(0), devices=("cuda:0", "cuda:1"))
    with engine.registry.using("double") as served:
        assert {i.device for i in served.instances} == {DEVICE, torch.device("cuda:1")}
    x = np.arange(8, dtype=np.float32)
    for _ in range(4):  # the least busy instance each time: both are used
        v = np.ones(8, np.float32)
        # Defect 7: the seeds went to cuda:0 while the output was on cuda:1.
        outcome = engine.grad_model("double", [("input", x)], grad_outputs=[("output", v)])
        np.testing.assert_array_equal(outcome.grads[0][1], 2 * v)


# ---------------------------------------------------------------- defects 5, 6: staging


def _staged(stager: CudaStager, payload: np.ndarray) -> codec.Received[pb.InferRequest]:
    encoder = codec.Encoder(pb.InferRequest(model="identity"))
    encoder.named(encoder.message.inputs.add(), "input", payload)
    receiver = streaming.StreamReceiver(pb.InferRequest, stager.allocate, landed=stager.landed)
    for raw in streaming.parts(encoder, 1 << 20):
        receiver.feed(raw)
    return receiver.finish()


def test_a_staged_payload_is_read_only_after_its_late_copies_land() -> None:
    payload = sample(np.dtype(np.uint8), (16 << 20,))
    stager = CudaStager(DEVICE, LIMITS, pinned_limit=1 << 30)
    with torch.cuda.stream(stager.stream):
        torch.cuda._sleep(CYCLES)  # every copy queues behind this
    request = _staged(stager, payload)
    try:
        with stager.using():
            arr = request.array(request.message.inputs[0].tensor, "input")
            on_device = to_device(arr, DEVICE)
            assert on_device.cpu().numpy().tobytes() == payload.tobytes()
    finally:
        stager.close()


def test_a_cut_streams_late_copy_never_lands_in_memory_handed_on() -> None:
    n = 8 << 20
    stager = CudaStager(DEVICE, LIMITS, pinned_limit=1 << 30)
    arr = stager.allocate(np.dtype(np.uint8), (n,), "input")
    arr[:] = 0xAB
    address = stager._devices[0].data_ptr()
    with torch.cuda.stream(stager.stream):
        torch.cuda._sleep(CYCLES)
    stager.landed(0, 0, n)  # the copy queues behind the sleep
    stager.close()  # the stream was cut: the buffers go, no wait on the host
    reused = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    if reused.data_ptr() != address:
        pytest.skip("the caching allocator gave another block: nothing to probe")
    reused.fill_(1)
    assert bool((reused.cpu() == 1).all())  # the late copy ran before, not over it


def test_staging_never_shares_a_stream_with_an_instance() -> None:
    engine = engine_with("double", SlowDouble(0), instances=4)
    with engine.registry.using("double") as served:
        instances = {i.stream.stream_id for i in served.instances}
    # More stagers than the pool's 32 streams: each priority has a pool of its own.
    stagers = {CudaStager(DEVICE, LIMITS).stream.stream_id for _ in range(40)}
    assert not instances & stagers


# ---------------------------------------------------------------- defect 8: the device


def test_functions_on_the_second_gpu_run_there() -> None:
    two_gpus()

    def where(x: torch.Tensor) -> torch.Tensor:
        # Code that names no device means the current one.
        return torch.tensor([torch.cuda.current_device(), selected().index], device="cuda")  # type: ignore[union-attr]

    engine = Engine(
        torch.device("cuda:1"), functions={**FUNCTIONS, "where": Function("where", where, "")}
    )
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: engine.call("where", [np.ones(1)], {})[0][1], range(4)))
    assert all(out.tolist() == [1, 1] for out in outs)


# ---------------------------------------------------------------- defects 2, 3, 4: errors


def test_out_of_memory_then_normal_service_with_the_memory_given_back() -> None:
    for address in start(Settings(port=0, device="cuda")):
        with Client(address, timeout=120) as c:
            a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
            c.call("matmul", a, a)  # cuBLAS' handle and workspace made before the test
            torch.cuda.synchronize()
            reserved = torch.cuda.memory_reserved()

            def given_back(limit: int = reserved + (64 << 20)) -> bool:
                return torch.cuda.memory_reserved() <= limit

            free = c.info().device.free_memory_bytes
            for _ in range(2):
                with pytest.raises(ResourceExhaustedError, match="out of cuda memory"):
                    # A result twice the free memory.
                    c.call(
                        "kron",
                        np.ones((1 << 16, 1), np.float32),
                        np.ones((1, max(free >> 17, 1)), np.float32),
                    )
                # The failed request's memory is back in the driver's hands.
                assert wait_for(given_back)
                np.testing.assert_allclose(c.call("matmul", a, a), a @ a, rtol=1e-4, atol=1e-3)
                assert c.infer("identity", np.arange(3))["output"].tolist() == [0, 1, 2]
        with grpc.insecure_channel(address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_a_device_side_assert_turns_the_server_not_serving_and_refuses_what_follows() -> None:
    flags = ("--device", "cuda", "--model", "poison=support.toy_models:device_assert")
    with spawn_server(*flags) as (proc, address, lines):
        with Client(address, timeout=60, retries=0) as c:
            assert c.infer("identity", np.ones(2))["output"].tolist() == [1, 1]
            with pytest.raises(InternalError, match="must be restarted"):
                c.infer("poison", np.ones(4, np.float32))
            with pytest.raises(InternalError, match="device failed"):
                c.infer("identity", np.ones(2))
        with grpc.insecure_channel(address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.poll() is None  # it says so and waits to be restarted; no crash
        assert any("device-side assert" in line for line in lines), lines[-5:]
