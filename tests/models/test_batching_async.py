"""Dynamic batching from the server's event loop: requests wait as tasks, not threads,
so a batch grows past the threads there are; a request cancelled while it waits
neither runs nor stalls the model; waiting tasks and threads share one queue."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from test_batching import Gated, rows, serve, statistics

import tensorwire as tw
from tensorwire_server.transport.executor import Compute

pytestmark = pytest.mark.timeout(120)


def infer(engine: object, compute: Compute, x: np.ndarray, deadline: float | None = None) -> object:
    return engine.infer_async("gated", [("input", x)], (), 0, deadline, compute.run)  # type: ignore[attr-defined]


def test_a_batch_grows_past_the_threads_there_are() -> None:
    module = Gated(hold=0.2)
    engine = serve(module)
    compute = Compute(workers=2)
    inputs = [rows(1 + i % 3, i) for i in range(24)]

    async def main() -> list[object]:
        return await asyncio.gather(*(infer(engine, compute, x) for x in inputs))

    try:
        results = asyncio.run(main())
    finally:
        compute.close()
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.outputs[0][1], x * 2)  # type: ignore[attr-defined]
    # The first ran alone; the 23 others waited as tasks, two threads for all of them,
    # and ran together as one batch.
    assert len(module.rows) == 2 and module.rows[1] == sum(len(x) for x in inputs[1:])
    stats = statistics(engine)
    assert stats.requests == 24 and stats.failures == 0  # type: ignore[attr-defined]


def test_a_cancelled_request_neither_runs_nor_stalls_the_model() -> None:
    module = Gated(hold=0.3)
    engine = serve(module, max_batch_size=1)
    compute = Compute(workers=2)

    async def main() -> tuple[object, object]:
        first = asyncio.ensure_future(infer(engine, compute, rows(1, 0)))
        await asyncio.sleep(0.05)  # it holds the only instance
        # Queued behind it: one that is cancelled (its client went away), and one that
        # must still be served once the instance is free.
        gone = asyncio.ensure_future(infer(engine, compute, rows(1, 1)))
        await asyncio.sleep(0.05)
        gone.cancel()
        last = asyncio.ensure_future(infer(engine, compute, rows(1, 2)))
        return await first, await asyncio.wait_for(last, 10)

    try:
        first, last = asyncio.run(main())
    finally:
        compute.close()
    np.testing.assert_array_equal(first.outputs[0][1], rows(1, 0) * 2)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(last.outputs[0][1], rows(1, 2) * 2)  # type: ignore[attr-defined]
    assert module.rows == [1, 1]  # the cancelled one never ran


def test_a_queued_task_past_its_deadline_never_runs() -> None:
    module = Gated(hold=0.5)
    engine = serve(module, max_batch_size=1)
    compute = Compute(workers=2)

    async def main() -> None:
        first = asyncio.ensure_future(infer(engine, compute, rows(1, 0)))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(tw.DeadlineExceededError, match="did not run"):
            await infer(engine, compute, rows(1, 1), deadline=time.monotonic() + 0.1)
        assert time.monotonic() - started < 0.4
        await first

    try:
        asyncio.run(main())
    finally:
        compute.close()
    assert module.rows == [1]
    assert statistics(engine).expired == 1  # type: ignore[attr-defined]


def test_tasks_and_threads_share_one_queue() -> None:
    module = Gated(hold=0.2)
    engine = serve(module)
    compute = Compute(workers=2)
    threaded: list[object] = []

    def on_a_thread(i: int) -> None:
        threaded.append(engine.infer("gated", [("input", rows(1, 100 + i))]))

    async def main() -> list[object]:
        threads = [threading.Thread(target=on_a_thread, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        results = await asyncio.gather(*(infer(engine, compute, rows(1, i)) for i in range(8)))
        for t in threads:
            await asyncio.to_thread(t.join, 30)
        return results

    try:
        results = asyncio.run(main())
    finally:
        compute.close()
    assert len(results) == 8 and len(threaded) == 4
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs[0][1], rows(1, i) * 2)  # type: ignore[attr-defined]
    assert sum(module.rows) == 12 and max(module.rows) > 1
