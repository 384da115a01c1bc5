"""Dynamic batching: batched results equal unbatched ones, a request's own error fails
it alone, full queues shed load, queued deadlines expire, instances run side by side."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import start
from torch import nn

import tensorwire as tw
from tensorwire_server.engine.engine import Engine
from tensorwire_server.models.builtins import builtin_config, builtin_models
from tensorwire_server.models.config import Batching, ModelConfig
from tensorwire_server.models.model import IOSpec, Model
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

CPU = torch.device("cpu")


class Gated(nn.Module):
    """Doubles its input; each forward pass waits for ``gate`` and records how many
    passes run at once and the rows of each."""

    def __init__(self, hold: float = 0.0) -> None:
        super().__init__()
        self.hold = hold
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.rows: list[int] = []

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.rows.append(int(input.shape[0]))
        time.sleep(self.hold)
        with self.lock:
            self.running -= 1
        if torch.isnan(input).any():
            raise ValueError("NaN in the input")
        return input * 2


def serve(
    module: nn.Module,
    *,
    max_batch_size: int = 64,
    delay: float = 0.0,
    instances: int = 1,
    max_queue_size: int = 1024,
    batching: bool = True,
) -> Engine:
    engine = Engine(CPU)
    spec = IOSpec("input", "float32", (-1, 4))
    model = Model("gated", module, (spec,), (IOSpec("output", "float32", (-1, 4)),))
    config = ModelConfig(
        "gated",
        inputs=model.inputs,
        outputs=model.outputs,
        max_batch_size=max_batch_size,
        batching=Batching(delay) if batching else None,
        instances=instances,
        max_queue_size=max_queue_size,
    )
    engine.serve(model, config)
    return engine


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def concurrently(count: int, fn: object) -> list[object]:
    """Run ``fn(i)`` for each i on its own thread at once; results or exceptions."""
    barrier = threading.Barrier(count)

    def one(i: int) -> object:
        barrier.wait()
        try:
            return fn(i)  # type: ignore[operator]
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def statistics(engine: Engine, name: str = "gated") -> object:
    entry = engine.registry.entries()[name]
    newest = entry.newest()
    assert newest is not None
    return newest.stats.snapshot()


def test_queued_requests_run_as_one_batch_and_each_gets_its_own_rows() -> None:
    module = Gated(hold=0.2)
    engine = serve(module)
    inputs = [rows(1 + i % 3, i) for i in range(12)]
    results = concurrently(12, lambda i: engine.infer("gated", [("input", inputs[i])]))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs[0][1], inputs[i] * 2)  # type: ignore[attr-defined]
    # The first request ran alone; the rest waited for it and ran together.
    assert len(module.rows) < 12
    assert max(module.rows) > 1
    stats = statistics(engine)
    assert stats.requests == 12 and stats.failures == 0  # type: ignore[attr-defined]
    assert stats.inferences == sum(len(x) for x in inputs)  # type: ignore[attr-defined]
    assert stats.executions == len(module.rows)  # type: ignore[attr-defined]
    assert sum(stats.batch_sizes.values()) == len(module.rows)  # type: ignore[attr-defined]


def test_a_request_whose_data_breaks_the_batch_fails_alone() -> None:
    module = Gated(hold=0.2)
    engine = serve(module)
    inputs = [rows(2, i) for i in range(8)]
    inputs[5][1, 2] = np.nan
    results = concurrently(8, lambda i: engine.infer("gated", [("input", inputs[i])]))
    for i, result in enumerate(results):
        if i == 5:
            assert isinstance(result, tw.InvalidArgumentError)
            assert "NaN in the input" in str(result)
        else:
            np.testing.assert_array_equal(result.outputs[0][1], inputs[i] * 2)  # type: ignore[attr-defined]
    stats = statistics(engine)
    assert stats.failures == 1  # type: ignore[attr-defined]


def test_a_malformed_request_fails_before_it_is_queued() -> None:
    module = Gated(hold=0.1)
    engine = serve(module)
    inputs = [rows(1, i) for i in range(6)]
    bad = np.zeros((1, 5), np.float32)

    def send(i: int) -> object:
        return engine.infer("gated", [("input", bad if i == 3 else inputs[i])])

    results = concurrently(6, send)
    assert isinstance(results[3], tw.InvalidArgumentError)
    assert "shape [1, 5]" in str(results[3])
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(results[i].outputs[0][1], inputs[i] * 2)  # type: ignore[attr-defined]


def test_a_full_queue_sheds_load_with_resource_exhausted() -> None:
    module = Gated(hold=0.3)
    engine = serve(module, max_batch_size=1, max_queue_size=2)
    results = concurrently(8, lambda i: engine.infer("gated", [("input", rows(1, i))]))
    shed = [r for r in results if isinstance(r, tw.ResourceExhaustedError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert shed and served
    assert "max_queue_size" in str(shed[0])
    assert len(module.rows) == len(served)  # a shed request never ran
    assert statistics(engine).rejected == len(shed)  # type: ignore[attr-defined]


def test_a_deadline_that_passes_in_the_queue_means_the_request_never_runs() -> None:
    module = Gated(hold=0.5)
    engine = serve(module, max_batch_size=1)
    first = threading.Thread(target=engine.infer, args=("gated", [("input", rows(1, 0))]))
    first.start()
    time.sleep(0.1)  # the first request holds the only instance
    started = time.monotonic()
    with pytest.raises(tw.DeadlineExceededError, match="did not run"):
        engine.infer("gated", [("input", rows(1, 1))], deadline=time.monotonic() + 0.1)
    assert time.monotonic() - started < 0.4  # answered at its deadline, not after the batch
    first.join()
    assert module.rows == [1]
    stats = statistics(engine)
    assert stats.expired == 1 and stats.failures == 1  # type: ignore[attr-defined]


def test_the_queue_delay_gathers_requests_that_arrive_apart() -> None:
    module = Gated()
    engine = serve(module, delay=0.3)

    def send(i: int) -> object:
        time.sleep(0.03 * i)
        return engine.infer("gated", [("input", rows(1, i))])

    results = concurrently(4, send)
    assert all(not isinstance(r, Exception) for r in results)
    assert module.rows == [4]


def test_instances_run_batches_side_by_side() -> None:
    module = Gated(hold=0.2)
    engine = serve(module, max_batch_size=1, instances=3)
    results = concurrently(6, lambda i: engine.infer("gated", [("input", rows(1, i))]))
    assert all(not isinstance(r, Exception) for r in results)
    assert module.most == 3


def test_unbatched_requests_are_spread_over_instances() -> None:
    module = Gated(hold=0.2)
    engine = serve(module, instances=2, batching=False)
    served = engine.registry.entries()["gated"].newest()
    assert served is not None and served.batcher is None
    seen: list[int] = []
    original = served.pick

    def pick() -> object:
        instance = original()
        seen.append(served.instances.index(instance))
        return instance

    served.pick = pick  # type: ignore[method-assign]
    results = concurrently(4, lambda i: engine.infer("gated", [("input", rows(1, i))]))
    assert all(not isinstance(r, Exception) for r in results)
    assert set(seen) == {0, 1}


def test_grad_is_never_batched() -> None:
    module = Gated(hold=0.1)
    engine = serve(module)
    results = concurrently(
        4,
        lambda i: engine.grad_model("gated", [("input", rows(2, i))], (), [("output", rows(2, 9))]),
    )
    assert all(not isinstance(r, Exception) for r in results)
    assert module.rows == [2, 2, 2, 2]
    for result in results:
        np.testing.assert_array_equal(result.grads[0][1], rows(2, 9) * 2)  # type: ignore[attr-defined]


# ------------------------------------------------------------ over gRPC, built-in models


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    """The same built-ins served with and without dynamic batching."""
    batched = start(Settings(port=0, device="cpu"))
    alone = start(Settings(port=0, device="cpu", dynamic_batching=False))
    yield next(batched), next(alone)
    for gen in (batched, alone):
        gen.close()


@pytest.mark.parametrize("name", sorted(builtin_models()))
def test_batched_results_equal_unbatched_results_for_every_builtin(
    servers: tuple[str, str], name: str
) -> None:
    batched, alone = servers
    dtype = np.float64 if name == "mlp64" else np.float32
    inputs = [
        np.random.default_rng(i).standard_normal((1 + i % 4, 16)).astype(dtype) for i in range(32)
    ]
    with tw.Client(batched, timeout=60) as b, tw.Client(alone, timeout=60) as a:

        def send(c: tw.Client, x: np.ndarray) -> dict[str, np.ndarray]:
            return c.infer(name, {"input": x})

        together = concurrently(32, lambda i: send(b, inputs[i]))
        one_by_one = [send(a, x) for x in inputs]
        stats = b.model_statistics(name) if name in ("mlp", "mlp64") else None
    for got, want in zip(together, one_by_one, strict=True):
        assert isinstance(got, dict), got
        assert got.keys() == want.keys()
        for key, value in want.items():
            # Equal up to rounding: the BLAS picks its kernel (and so its order of
            # summation) by the number of rows, which batching changes.
            assert got[key].dtype == value.dtype
            tight = {np.float32: (1e-6, 1e-7), np.float64: (1e-14, 1e-15)}
            rtol, atol = tight.get(value.dtype.type, (0, 0))
            np.testing.assert_allclose(got[key], value, rtol=rtol, atol=atol)
    if stats is not None:
        assert stats[0].requests >= 32


def test_builtin_mlp_is_configured_to_batch() -> None:
    mlp = builtin_models()["mlp"]
    config = builtin_config(mlp, dynamic_batching=True)
    assert config.max_batch_size > 0 and config.batching is not None
    assert builtin_config(mlp, dynamic_batching=False).batching is None
