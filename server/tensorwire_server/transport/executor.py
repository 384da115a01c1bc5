"""Where a request's torch work runs: on a thread off the event loop, or on the loop
itself when it costs less there than handing it over.

The loop hands work to a pool of ``workers`` threads (torch releases the GIL inside its
kernels, and CUDA work queues on each instance's own stream), with the call's context
(its record, for logs and metrics) carried across. The hand-over has a price: on the
2-core development machine about 80 µs of CPU and 180 µs of latency per request
(docs/benchmarks.md), more than a small request's whole torch work. So each kind of
work (a method, its model or function, its payload size to a power of two) is
measured where it runs, as the CPU time of the thread that ran it: the wall clock would
count the waits for the GIL (up to its 5 ms switch interval) and for the CPU (other
processes preempt the loop on a busy machine), which say nothing of the work itself.
A kind whose thread
cost is small (below ``PROBE_BELOW``) is tried on the loop, then now and then again;
while its cost there stays below ``inline_below`` it runs there. A kind not yet seen
runs on a thread, and so does anything expensive. A request that waited for a thread
past its deadline is not run at all.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Hashable
from concurrent import futures
from typing import Any, Final, TypeVar

from tensorwire.errors import DeadlineExceededError
from tensorwire_server import calls, timeline

R = TypeVar("R")

#: Work that holds the loop for less than this many seconds runs on it.
INLINE_BELOW: Final = 500e-6
#: Work that costs a thread less CPU than this may be tried on the loop.
PROBE_BELOW: Final = 5e-3
#: A kind kept on threads is tried on the loop again after this many requests.
PROBE_EVERY: Final = 64
#: The weight of each new measurement in a kind's moving average.
_WEIGHT: Final = 0.2


class Compute:
    """A pool of ``workers`` threads for torch work, fed from the event loop, and what
    each kind of work costs, which decides where it runs."""

    def __init__(self, workers: int, inline_below: float = INLINE_BELOW) -> None:
        self.pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="tensorwire")
        self.inline_below = inline_below
        #: Seconds each kind held the loop, and the CPU it took on a thread (moving
        #: averages); requests of each kind on threads since it was last tried on the loop.
        self.loop_costs: dict[Hashable, float] = {}
        self.thread_costs: dict[Hashable, float] = {}
        self._since_tried: dict[Hashable, int] = {}

    def waiting(self) -> int:
        """Pieces of work handed over and not yet started."""
        return self.pool._work_queue.qsize()

    def inline(self, kind: Hashable | None) -> bool:
        """Whether the next work of ``kind`` runs on the loop (None: never measured)."""
        if kind is None:
            return False
        on_loop = self.loop_costs.get(kind)
        if on_loop is not None and on_loop < self.inline_below:
            return True
        on_thread = self.thread_costs.get(kind)
        if on_thread is None or on_thread > PROBE_BELOW:
            return False  # unknown, or too expensive to try on the loop
        tried = self._since_tried.get(kind, PROBE_EVERY)
        if on_loop is None or tried >= PROBE_EVERY:
            self._since_tried[kind] = 0
            return True
        self._since_tried[kind] = tried + 1
        return False

    async def run(self, fn: Callable[..., R], *args: Any, kind: Hashable | None = None) -> R:
        """``fn(*args)``, in the calling task's context: on the loop when work of
        ``kind`` costs little there, else on a worker thread; what it returns or raises.
        DEADLINE_EXCEEDED, without running it, when the call's deadline passed while it
        waited for a worker."""
        on_loop = self.loop_costs.get(kind) if kind is not None else None
        if (on_loop is not None and on_loop < self.inline_below) or self.inline(kind):
            began = time.thread_time()
            try:
                return _on_time(fn, args)
            finally:
                _note(self.loop_costs, kind, time.thread_time() - began)
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        handed = time.perf_counter_ns()
        return await loop.run_in_executor(
            self.pool, context.run, self._on_thread, kind, fn, args, handed
        )

    def _on_thread(
        self, kind: Hashable | None, fn: Callable[..., R], args: tuple[Any, ...], handed: int
    ) -> R:
        found = timeline.current()
        if found is not None:  # the wait for a worker
            found.add(timeline.QUEUE, handed, time.perf_counter_ns())
        began = time.thread_time()
        try:
            return _on_time(fn, args)
        finally:
            if kind is not None:
                _note(self.thread_costs, kind, time.thread_time() - began)

    def close(self) -> None:
        """Let the workers finish what they run, and take no more."""
        self.pool.shutdown(wait=False, cancel_futures=True)


def _note(costs: dict[Hashable, float], kind: Hashable | None, seconds: float) -> None:
    """Fold a measurement into ``kind``'s moving average (without a lock: a lost
    update only skews the average)."""
    if kind is not None:
        old = costs.get(kind)
        costs[kind] = seconds if old is None else old + _WEIGHT * (seconds - old)


def _on_time(fn: Callable[..., R], args: tuple[Any, ...]) -> R:
    call = calls.current()
    if call is not None and call.deadline is not None and time.monotonic() > call.deadline:
        raise DeadlineExceededError(
            "the deadline passed while the request waited for a worker; it did not run"
        )
    return fn(*args)
