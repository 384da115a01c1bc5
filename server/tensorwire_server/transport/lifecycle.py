"""Where the server is in its life (``Lifecycle``: starting, serving, draining,
stopped, failed), which the Gate checks each call against and health reports, and how
many calls run (``InFlight``), which a drain waits for."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tensorwire_server.transport.heap import HeapTrimmer

log = logging.getLogger(__name__)


class Lifecycle:
    """Where the server is in its life: starting, serving, draining or stopped.
    ``on_change`` hears each new state (the health service follows it)."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the device failed for good: an orchestrator must restart us

    def __init__(self, on_change: Callable[[str], None] | None = None) -> None:
        self.state = self.STARTING
        self._on_change = on_change
        if on_change is not None:
            on_change(self.state)

    def move(self, state: str) -> None:
        """Enter ``state``."""
        self.state = state
        log.info("server %s", state)
        if self._on_change is not None:
            self._on_change(state)


class InFlight:
    """How many requests are running, so that a drain can wait for them and not for
    long-lived streams such as health watches; ``heap`` hears of each too."""

    def __init__(self, heap: HeapTrimmer | None = None) -> None:
        self._count = 0
        # Entering and leaving take the plain lock: a Condition's ``with`` is Python code.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiters = 0  # in wait_idle: only they need a notify (a few µs a call)
        self._heap = heap

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1
        if self._heap is not None:
            self._heap.busy()

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._count -= 1
            if not self._count and self._waiters:
                self._idle.notify_all()
        if self._heap is not None:
            self._heap.idle()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until none run, at most ``timeout`` seconds; whether none run."""
        with self._idle:
            self._waiters += 1
            try:
                return self._idle.wait_for(lambda: not self._count, timeout)
            finally:
                self._waiters -= 1
