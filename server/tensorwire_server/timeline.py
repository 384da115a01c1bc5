"""Where a call's time went: the phases of one call (gate, queue, batch, copies,
forward, backward, transfer, encoding), recorded by whichever package does the work
and read when the call ends, by the metrics (queue and compute time per model) and,
where tracing is on, by the tracer, which makes them spans.

Recording is a clock read at each end of a phase and a tuple appended: no tracer runs
on a request's path, so a server with tracing off pays a microsecond or two, and one
with tracing on builds its spans after the response is sent (telemetry.tracing).

Shared vocabulary: any package may import it; it imports nothing of the server.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from typing import Any, Final

#: The phases' names, as the spans carry them.
GATE: Final = "gate"  # authentication, admission: the call's arrival to its handler
QUEUE: Final = "queue"  # waiting for a worker thread, or in a model's batch queue
BATCH: Final = "batch"  # a batch forming: the first request's arrival to its forward pass
UPLOAD: Final = "host_to_device"
FORWARD: Final = "forward"
BACKWARD: Final = "backward"
DOWNLOAD: Final = "device_to_host"
TRANSFER: Final = "transfer"  # bulk bytes over the data port or a same-host segment
ENCODE: Final = "encode"  # the response message built
#: The attribute that carries a phase's CUDA events (start, end), for the tracer.
EVENTS: Final = "_cuda_events"
#: The phases the per-model compute time adds up.
COMPUTE: Final = (FORWARD, BACKWARD)


class Batch:
    """The requests one forward pass served: each member's timeline names it, so that
    the tracer can link every request of a batch to the others."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: list[Timeline] = []


class Timeline:
    """One call's phases: (name, start, end, attributes), the clock
    ``time.perf_counter_ns``; the batch it ran in, if any; and, where the tracer follows
    the call, the span it made at the call's start (``root``)."""

    __slots__ = ("batch", "device_timing", "root", "spans", "start")

    def __init__(self) -> None:
        #: When the call arrived (perf_counter_ns): its record was made then.
        self.start = time.perf_counter_ns()
        self.spans: list[tuple[str, int, int, dict[str, Any] | None]] = []
        self.batch: Batch | None = None
        #: The tracer's span for the whole call (opaque here); None: not traced.
        self.root: Any = None
        #: Whether device work should be timed with device events (a traced call on a
        #: CUDA device): the launch returns before the device has done the work.
        self.device_timing = False

    def add(
        self, name: str, start: int, end: int, attributes: dict[str, Any] | None = None
    ) -> None:
        """Record phase ``name`` from ``start`` to ``end`` (perf_counter_ns)."""
        self.spans.append((name, start, end, attributes))

    def total(self, names: tuple[str, ...] | str) -> float:
        """Seconds spent in the phases named ``names``."""
        if isinstance(names, str):
            names = (names,)
        return sum(end - start for name, start, end, _ in self.spans if name in names) / 1e9


_CURRENT: ContextVar[Timeline | None] = ContextVar("timeline", default=None)
#: The timelines a batch's forward pass records into (set while it runs): every
#: request in the batch, whichever request's thread leads it.
_GROUP: ContextVar[list[Timeline] | None] = ContextVar("timelines", default=None)


def current() -> Timeline | None:
    """The timeline of the call being answered in this context, if any."""
    return _CURRENT.get()


def activate(timeline: Timeline | None) -> Token[Timeline | None]:
    """Make ``timeline`` the current one; a token for ``deactivate``."""
    return _CURRENT.set(timeline)


def deactivate(token: Token[Timeline | None]) -> None:
    """Restore the timeline current before ``activate``."""
    _CURRENT.reset(token)


class grouped:
    """Within the block, phases record into ``timelines`` (a batch's requests) instead
    of the current call's: ``with timeline.grouped(members): ...``."""

    __slots__ = ("timelines", "token")

    def __init__(self, timelines: list[Timeline]) -> None:
        self.timelines = timelines
        self.token: Token[list[Timeline] | None] | None = None

    def __enter__(self) -> None:
        self.token = _GROUP.set(self.timelines)

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _GROUP.reset(self.token)


class phase:
    """Record the block as phase ``name`` of the current call's timeline (of a batch's
    requests, within ``grouped``): ``with timeline.phase(FORWARD): ...``. Outside a
    call it records nothing and costs two context-variable reads.

    Given the ``device`` the block works on, and where a timeline asks for device
    timing (a traced call on CUDA), the block is also timed by CUDA events on the
    current stream: a kernel launch returns before the device has run it. The events
    ride in the phase's attributes (``EVENTS``) for the tracer, which reads them once
    the call is over."""

    __slots__ = ("attributes", "device", "events", "name", "start", "timelines")

    def __init__(
        self, name: str, attributes: dict[str, Any] | None = None, device: Any = None
    ) -> None:
        self.name = name
        self.attributes = attributes
        timelines: list[Timeline] | tuple[Timeline, ...] | None = _GROUP.get()
        if timelines is None:
            found = _CURRENT.get()
            timelines = (found,) if found is not None else ()
        self.timelines = timelines
        self.device = device
        self.events: tuple[Any, Any] | None = None
        self.start = 0

    def __enter__(self) -> phase:
        if self.timelines:
            device = self.device
            if (
                device is not None
                and device.type == "cuda"
                and any(t.device_timing for t in self.timelines)
            ):
                import torch  # the device's package has it loaded already

                self.events = (
                    torch.cuda.Event(enable_timing=True),  # type: ignore[no-untyped-call]
                    torch.cuda.Event(enable_timing=True),  # type: ignore[no-untyped-call]
                )
                self.events[0].record()
            self.start = time.perf_counter_ns()
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if self.timelines:
            end = time.perf_counter_ns()
            attributes = self.attributes
            if self.events is not None:
                self.events[1].record()
                attributes = {**(attributes or {}), EVENTS: self.events}
            for timeline in self.timelines:
                timeline.spans.append((self.name, self.start, end, attributes))
