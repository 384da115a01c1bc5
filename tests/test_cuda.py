"""On a GPU: placement, the pinned-memory path, and results equal to the CPU's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import start

from tensorwire import Client
from tensorwire_server.settings import Settings
from tensorwire_server.tensors import resolve_device, to_device, to_numpy

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
    from test_codec import sample

    from tensorwire.dtypes import NUMPY_BY_WIRE

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
