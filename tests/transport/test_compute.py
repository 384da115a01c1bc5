"""Where torch work runs: cheap kinds of work on the event loop, the rest on threads,
as measured; a request that waited for a thread past its deadline does not run."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tensorwire import DeadlineExceededError
from tensorwire_server import calls
from tensorwire_server.transport.executor import PROBE_EVERY, Compute


def test_cheap_work_moves_onto_the_loop_and_dear_work_stays_on_threads() -> None:
    compute = Compute(workers=2, inline_below=0.005)

    def where() -> str:
        return threading.current_thread().name

    def dear() -> str:
        end = time.thread_time() + 0.02  # 20 ms of CPU: dearer than handing over
        while time.thread_time() < end:
            pass
        return where()

    async def main() -> tuple[list[str], list[str], list[str]]:
        loop_thread = threading.current_thread().name
        cheap = [await compute.run(where, kind="cheap") for _ in range(10)]
        unknown = [await compute.run(where) for _ in range(3)]  # no kind: never measured
        dearer = [await compute.run(dear, kind="dear") for _ in range(PROBE_EVERY + 2)]
        return (
            [t == loop_thread for t in cheap],
            [t == loop_thread for t in unknown],
            [t == loop_thread for t in dearer],
        )

    try:
        cheap, unknown, dearer = asyncio.run(main())
    finally:
        compute.close()
    # The first on a thread (never seen), the second tried on the loop, then there.
    assert cheap[:2] == [False, True] and all(cheap[1:])
    assert not any(unknown)
    # Too dear on a thread to try on the loop at all.
    assert not any(dearer)
    assert compute.loop_costs["cheap"] < compute.inline_below
    assert compute.thread_costs["dear"] >= 0.015


def test_work_that_waited_past_its_deadline_does_not_run() -> None:
    compute = Compute(workers=1)
    ran: list[str] = []

    async def main() -> None:
        call = calls.Call("/t/T", "id")
        call.deadline = time.monotonic() + 0.2
        token = calls.set_current(call)
        try:
            busy = asyncio.ensure_future(compute.run(time.sleep, 0.5))  # holds the worker
            await asyncio.sleep(0.05)
            with pytest.raises(DeadlineExceededError, match="waited for a worker"):
                await compute.run(ran.append, "late")
            await busy
        finally:
            calls.reset_current(token)

    try:
        asyncio.run(main())
    finally:
        compute.close()
    assert ran == []
