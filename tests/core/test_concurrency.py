"""16 concurrent clients x 50 mixed requests: every result correct."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tensorwire import Client, InvalidArgumentError, NotFoundError
from tensorwire_server.models.builtins import builtin_models

CLIENTS, REQUESTS = 16, 50
MLP = builtin_models()["mlp64"].module


def expected_mlp(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return MLP(torch.from_numpy(x)).numpy()


def worker(address: str, seed: int) -> int:
    rng = np.random.default_rng(seed)
    checked = 0
    with Client(address, timeout=60) as c:
        for i in range(REQUESTS):
            kind = (seed + i) % 6
            if kind == 0:
                x = rng.standard_normal((int(rng.integers(1, 64)), 16))
                # Batched with other clients' rows, BLAS may block the matmul another
                # way: the same float64 result up to rounding, hence the atol near 0.
                np.testing.assert_allclose(
                    c.infer("mlp64", x)["output"], expected_mlp(x), rtol=1e-12, atol=1e-14
                )
            elif kind == 1:
                x = rng.integers(-100, 100, size=int(rng.integers(0, 5000)), dtype=np.int32)
                assert c.infer("identity", x)["output"].tobytes() == x.tobytes()
            elif kind == 2:
                a, b = rng.standard_normal((20, 30)), rng.standard_normal((30, 5))
                np.testing.assert_allclose(c.call("matmul", a, b), a @ b, rtol=1e-10)
            elif kind == 3:
                a = rng.standard_normal((6, 6)) + 6 * np.eye(6)
                r = c.call_grad("linalg.det", a)
                np.testing.assert_allclose(
                    r.grads["0"], np.linalg.det(a) * np.linalg.inv(a).T, rtol=1e-8
                )
            elif kind == 4:
                x = rng.standard_normal((3, 16))
                r = c.grad("mlp64", x, grad_outputs=np.ones((3, 4)))
                np.testing.assert_allclose(r.outputs["output"], expected_mlp(x), rtol=1e-12)
            else:  # errors mixed in must not disturb anyone else
                with pytest.raises(InvalidArgumentError):
                    c.infer("mlp64", rng.standard_normal((2, 15)))
                with pytest.raises(NotFoundError):
                    c.call("no.such.function")
            checked += 1
    return checked


def test_concurrent_clients_get_correct_results(address: str) -> None:
    with ThreadPoolExecutor(CLIENTS) as pool:
        done = list(pool.map(worker, [address] * CLIENTS, range(CLIENTS)))
    assert done == [REQUESTS] * CLIENTS
