"""Dynamic batching: concurrent requests to one model version stacked into one forward
pass on one of its instances, and the outputs split back.

There is no batching thread. A request that finds an instance idle leads: it gathers
the queue's compatible requests into a batch (waiting up to the queue delay for
company), runs it, wakes each request with its rows of the outputs, and hands the
instance to the request now at the head of the queue, which leads the next batch. So
a request costs one wake-up, an idle model adds no delay at all, and under load
batches grow by themselves while an instance is busy.

Requests wait either on a thread (``submit``) or as a task on the server's event loop
(``submit_async``), and both kinds share one queue. A task waits without a thread:
only a batch's leading runs on one (``run``, the server's Compute), so a batch grows
past the number of threads, and a request costs one hand-over per batch, not one each.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from tensorwire.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TensorwireError,
)
from tensorwire_server import timeline
from tensorwire_server.models.config import Batching
from tensorwire_server.models.statistics import VersionStats
from tensorwire_server.named import Named
from tensorwire_server.timeline import Batch, Timeline

I = TypeVar("I")  # noqa: E741 -- an instance of the model, whatever the registry makes it

#: Runs a blocking function on a thread and awaits it (the server's Compute.run).
Runner = Callable[..., Awaitable[Any]]

# Errors a request's own inputs can cause: in a batch, the batch is re-run one request
# at a time so that only the request at fault fails.
_OWN_ERRORS = (InvalidArgumentError, FailedPreconditionError, ResourceExhaustedError)


class _Pending:
    """One request in the queue, and then its answer."""

    __slots__ = (
        "arrived",
        "batch",
        "deadline",
        "done",
        "enqueued",
        "error",
        "finished",
        "inputs",
        "key",
        "lead",
        "notify",
        "outputs",
        "queued",
        "rows",
        "timeline",
    )

    def __init__(
        self,
        inputs: Named[np.ndarray],
        key: object,
        rows: int,
        deadline: float | None,
        woken: asyncio.Event | None = None,
    ) -> None:
        self.inputs = inputs
        self.key = key
        self.rows = rows
        self.deadline = deadline
        self.enqueued = time.monotonic()
        #: The call's timeline (its wait here and its share of the forward pass go in
        #: it), and when it arrived, on the timeline's clock.
        self.timeline = timeline.current()
        self.arrived = time.perf_counter_ns()
        self.queued = True
        self.finished = False
        self.done = threading.Event()
        #: Wakes the request: its thread (the Event), or its task on the loop.
        self.notify: Callable[[], object] = self.done.set
        if woken is not None:
            loop = asyncio.get_running_loop()
            self.notify = lambda: loop.call_soon_threadsafe(woken.set)
        self.outputs: Named[np.ndarray] = []
        self.error: BaseException | None = None
        self.batch = 0
        self.lead: object | None = None  # an instance handed to this request's thread


class Batcher(Generic[I]):
    """Batches one model version's requests over its instances.

    ``execute(instance, inputs)`` runs one forward pass and returns its outputs as
    arrays; the batcher stacks inputs along the first dimension, splits outputs the
    same way, and isolates a request whose inputs make the forward fail.
    """

    def __init__(
        self,
        model: str,
        instances: Sequence[I],
        execute: Callable[[I, Named[np.ndarray]], Named[np.ndarray]],
        max_batch_size: int,
        batching: Batching,
        max_queue_size: int,
        stats: VersionStats,
    ) -> None:
        self.model = model
        self.execute = execute
        self.max_batch_size = max_batch_size
        self.delay = batching.max_queue_delay
        self.preferred = frozenset(batching.preferred_batch_sizes)
        # A batch this big runs at once, without waiting out the delay.
        self.enough = min(max(self.preferred, default=max_batch_size), max_batch_size)
        self.max_queue_size = max_queue_size
        self.stats = stats
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[_Pending] = deque()
        self._idle: list[I] = list(instances)
        self._handing: set[asyncio.Future[Any]] = set()

    def queued(self) -> int:
        """Requests waiting for a forward pass now."""
        with self._lock:
            return len(self._queue)

    def submit(
        self, inputs: Named[np.ndarray], deadline: float | None
    ) -> tuple[Named[np.ndarray], int]:
        """Run ``inputs`` (bound and checked against the signature) in a batch; return
        this request's outputs and the rows of the forward pass that made them.
        ``deadline`` is a ``time.monotonic()`` instant: a request still queued then
        gets DeadlineExceededError and never runs."""
        rows, key = _batchable(inputs, self.max_batch_size)
        pending = _Pending(inputs, key, rows, deadline)
        instance = self._enqueue(pending)
        if instance is not None:
            self._lead(instance)
        return self._await(pending)

    async def submit_async(
        self, inputs: Named[np.ndarray], deadline: float | None, run: Runner
    ) -> tuple[Named[np.ndarray], int]:
        """``submit`` for a task on the event loop: it waits without a thread, and leads
        a batch, when its turn comes, on a thread through ``run``."""
        rows, key = _batchable(inputs, self.max_batch_size)
        woken = asyncio.Event()
        pending = _Pending(inputs, key, rows, deadline, woken)
        instance = self._enqueue(pending)
        try:
            if instance is not None:
                await run(self._lead, instance)
            return await self._await_async(pending, woken, run)
        except BaseException:
            # Cancelled (the client went away): it must neither run for nobody nor keep
            # an instance it was handed, or the model would stall.
            with self._lock:
                if pending.queued:
                    self._queue.remove(pending)
                    pending.queued = False
                lead, pending.lead = pending.lead, None
            if lead is not None:
                handing = asyncio.ensure_future(run(self._lead, lead))
                self._handing.add(handing)  # kept until done: a task nobody holds may vanish
                handing.add_done_callback(self._handing.discard)
            raise

    async def _await_async(
        self, pending: _Pending, woken: asyncio.Event, run: Runner
    ) -> tuple[Named[np.ndarray], int]:
        while True:
            if pending.finished:
                if pending.error is not None:
                    raise pending.error
                return pending.outputs, pending.batch
            timeout = None if pending.deadline is None else pending.deadline - time.monotonic()
            try:
                await asyncio.wait_for(woken.wait(), None if timeout is None else max(timeout, 0))
            except TimeoutError:
                with self._lock:
                    if pending.queued:
                        self._expire(pending)
                pending.deadline = None  # it runs already: wait for its outputs
                continue
            woken.clear()  # a late wake-up only makes the loop look again
            with self._lock:
                lead, pending.lead = pending.lead, None
            if lead is not None:  # the instance is this request's to lead a batch on
                await run(self._lead, lead)

    def _enqueue(self, pending: _Pending) -> I | None:
        """Queue ``pending`` (RESOURCE_EXHAUSTED when the queue is full); an idle
        instance for it to lead a batch on, if there is one."""
        with self._lock:
            if len(self._queue) >= self.max_queue_size:
                self.stats.rejected()
                raise ResourceExhaustedError(
                    f"model {self.model!r} has {len(self._queue)} requests queued, its "
                    "max_queue_size: try again later"
                )
            self._queue.append(pending)
            instance = self._idle.pop() if self._idle else None
            self._arrived.notify()  # a leader waiting out the delay counts rows again
        return instance

    def _await(self, pending: _Pending) -> tuple[Named[np.ndarray], int]:
        while True:
            timeout = None if pending.deadline is None else pending.deadline - time.monotonic()
            if not pending.done.wait(None if timeout is None else max(timeout, 0.0)):
                with self._lock:
                    if pending.queued:
                        self._expire(pending)
                pending.deadline = None  # it runs already: wait for its outputs
                continue
            if pending.lead is not None:
                with self._lock:  # another leader may have answered it meanwhile
                    instance, pending.lead = pending.lead, None
                    if not pending.finished:
                        pending.done.clear()
                self._lead(instance)  # type: ignore[arg-type]
                continue
            if pending.error is not None:
                raise pending.error
            return pending.outputs, pending.batch

    def _expire(self, pending: _Pending) -> None:
        """Drop a queued request whose deadline has passed (the lock is held)."""
        self._queue.remove(pending)
        pending.queued = False
        waited = time.monotonic() - pending.enqueued
        self.stats.expired(waited)
        pending.error = DeadlineExceededError(
            f"the deadline passed after {waited:.3f} s in model {self.model!r}'s queue; "
            "the request did not run"
        )
        pending.finished = True
        pending.notify()

    def _lead(self, instance: I) -> None:
        """Run the next batch on ``instance``, then hand it on (or leave it idle)."""
        with self._lock:
            batch = self._gather()
        if batch:
            self._run(instance, batch)
        with self._lock:
            if not self._queue:
                self._idle.append(instance)
                return
            head = self._queue[0]
            head.lead = instance
            head.notify()

    def _gather(self) -> list[_Pending]:
        """Take the head's batch from the queue, first waiting up to the delay for it
        to grow (the lock is held)."""
        while True:
            now = time.monotonic()
            for pending in [p for p in self._queue if p.deadline is not None and p.deadline <= now]:
                self._expire(pending)
            if not self._queue:
                return []
            head = self._queue[0]
            rows = sum(p.rows for p in self._queue if p.key == head.key)
            wait = head.enqueued + self.delay - now
            if wait <= 0 or rows >= self.enough or rows in self.preferred or head.key is None:
                break
            self._arrived.wait(wait)
        batch: list[_Pending] = []
        rest: deque[_Pending] = deque()
        total = 0
        for pending in self._queue:
            fits = pending.key == head.key and total + pending.rows <= self.max_batch_size
            if pending is head or (fits and head.key is not None):
                batch.append(pending)
                total += pending.rows
                pending.queued = False
            else:
                rest.append(pending)
        self._queue = rest
        return batch

    def _run(self, instance: I, batch: list[_Pending]) -> None:
        started = time.monotonic()
        rows = sum(p.rows for p in batch)
        timelines = _joined(batch, rows)
        results: list[Named[np.ndarray] | BaseException] | None
        try:
            # The pass's phases (copies, forward) belong to every request in it.
            with timeline.grouped(timelines):
                if len(batch) == 1:
                    results = [self.execute(instance, batch[0].inputs)]
                else:
                    stacked = [
                        (name, np.concatenate([p.inputs[i][1] for p in batch]))
                        for i, (name, _) in enumerate(batch[0].inputs)
                    ]
                    results = list(_split(self.execute(instance, stacked), batch, rows))
        except (*_OWN_ERRORS, _SplitError) as exc:
            # Alone, the request's own error. In a batch, somebody's inputs broke it (or
            # its outputs cannot be split): run the requests one by one to find whose.
            results = [exc] if len(batch) == 1 else None
        except Exception as exc:  # the device failed, or a server bug: nobody's fault
            results = [_copy(exc, i) for i in range(len(batch))]
        self.stats.executed(rows, time.monotonic() - started)
        if results is None:
            self._one_by_one(instance, batch, started)
            return
        for pending, result in zip(batch, results, strict=True):
            self._answer(pending, result, rows, started)

    def _one_by_one(self, instance: I, batch: list[_Pending], started: float) -> None:
        for pending in batch:
            began = time.monotonic()
            result: Named[np.ndarray] | BaseException
            alone = [pending.timeline] if pending.timeline is not None else []
            try:
                with timeline.grouped(alone):
                    result = self.execute(instance, pending.inputs)
            except Exception as exc:
                result = exc
            self.stats.executed(pending.rows, time.monotonic() - began)
            self._answer(pending, result, pending.rows, started)

    def _answer(
        self,
        pending: _Pending,
        result: Named[np.ndarray] | BaseException,
        rows: int,
        started: float,
    ) -> None:
        self.stats.answered(not isinstance(result, BaseException), started - pending.enqueued)
        with self._lock:
            if isinstance(result, BaseException):
                pending.error = result
            else:
                pending.outputs = result
                pending.batch = rows
            pending.finished = True
            pending.notify()


class _SplitError(Exception):
    """A batch's outputs do not share its first dimension: they cannot be split."""


def _joined(batch: list[_Pending], rows: int) -> list[Timeline]:
    """The timelines of a batch's requests, each told of its wait for the batch and of
    the others in it (a tracer links them)."""
    now = time.perf_counter_ns()
    together = Batch()
    attributes = {"tensorwire.batch_size": rows, "tensorwire.batch_requests": len(batch)}
    for pending in batch:
        found = pending.timeline
        if found is not None:
            found.add(timeline.BATCH, pending.arrived, now, attributes)
            found.batch = together
            together.members.append(found)
    return together.members


def _batchable(inputs: Named[np.ndarray], max_batch_size: int) -> tuple[int, object]:
    """The request's rows, and the key requests must share to be stacked with it
    (None: it runs alone, as a request larger than a batch or without a common first
    dimension does)."""
    arrays = [arr for _, arr in inputs]
    if not arrays or any(arr.ndim == 0 for arr in arrays):
        return 1, None
    rows = arrays[0].shape[0]
    if rows == 0 or rows > max_batch_size or any(arr.shape[0] != rows for arr in arrays):
        return rows, None
    return rows, tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in inputs)


def _split(outputs: Named[np.ndarray], batch: list[_Pending], rows: int) -> list[Named[np.ndarray]]:
    """Each request's rows of every output (views: no copy)."""
    if any(arr.ndim == 0 or arr.shape[0] != rows for _, arr in outputs):
        raise _SplitError
    split: list[Named[np.ndarray]] = []
    start = 0
    for pending in batch:
        stop = start + pending.rows
        split.append([(name, arr[start:stop]) for name, arr in outputs])
        start = stop
    return split


def _copy(exc: Exception, index: int) -> BaseException:
    """``exc`` for one more request: each raises its own object."""
    if index == 0:
        return exc
    if isinstance(exc, TensorwireError):
        return type(exc)(exc.message)
    return copy.copy(exc)


__all__ = ["Batcher"]
