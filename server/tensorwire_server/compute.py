"""Where a request's torch work runs: threads off the event loop, so that the loop only
moves messages and never waits on a model.

The loop hands each piece of work to a pool of ``workers`` threads (torch releases the
GIL inside its kernels, and CUDA work queues on each instance's own stream), with the
call's context (its record, for logs and metrics) carried across. A request that
waited in the pool past its deadline is not run at all.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

from tensorwire.errors import DeadlineExceededError
from tensorwire_server import observe

R = TypeVar("R")


class Compute:
    """A pool of ``workers`` threads for torch work, fed from the event loop."""

    def __init__(self, workers: int) -> None:
        self.pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="tensorwire")

    def waiting(self) -> int:
        """Pieces of work handed over and not yet started."""
        return self.pool._work_queue.qsize()

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` on a worker thread, in the calling task's context; what it
        returns or raises. DEADLINE_EXCEEDED, without running it, when the call's
        deadline passed while it waited for a worker."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, context.run, _on_time, fn, args)

    def close(self) -> None:
        """Let the workers finish what they run, and take no more."""
        self.pool.shutdown(wait=False, cancel_futures=True)


def _on_time(fn: Callable[..., R], args: tuple[Any, ...]) -> R:
    call = observe.current()
    if call is not None and call.deadline is not None and time.monotonic() > call.deadline:
        raise DeadlineExceededError(
            "the deadline passed while the request waited for a worker; it did not run"
        )
    return fn(*args)
