"""The event loop's selector, which polls without sleeping for a moment after the
fast lane answers a call, so that the caller's next call finds the loop awake.

A loop that sleeps in the kernel between calls pays twice on the next one: the wake-up
itself, and a cold CPU (caches and branch predictors another process used meanwhile):
on the 2-core development VM the same small call's handler costs ~167 µs of CPU back
to back and ~230 µs after 300 µs asleep. A caller that calls in a loop leaves the
server idle for about its own share of each round trip, so polling through that gap
(``seconds`` after the last answer, 500 µs by default) took ~70-90 µs off a small
same-host call's p50 (docs/performance.md). What it costs: at most ``seconds`` of
one core's time per answer, and nothing once calls stop coming; a loop with work to
do never polls (its timeout is 0 anyway).
"""

from __future__ import annotations

import os
import selectors
import time
from typing import Any


def _no_yield() -> None:
    """Where the platform has no sched_yield (Windows): poll on."""


sched_yield = getattr(os, "sched_yield", _no_yield)


class SpinningSelector(selectors.DefaultSelector):
    """The platform's default selector, polling (timeout 0) instead of sleeping until
    ``seconds`` after the last ``warm()``."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds
        self._until = 0.0

    def warm(self) -> None:
        """A call was answered: keep polling ``seconds`` from now (0: never)."""
        if self.seconds > 0:
            self._until = time.monotonic() + self.seconds

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is None or timeout > 0:
            now = time.monotonic()
            if now < self._until:
                end = self._until if timeout is None else min(self._until, now + timeout)
                poll = super().select
                while True:
                    ready = poll(0)
                    if ready:
                        return ready
                    if time.monotonic() >= end:
                        break
                    sched_yield()  # to whatever else would run here (the caller, say)
                if timeout is not None:  # what is left of the loop's own timeout
                    timeout = max(0.0, timeout - (time.monotonic() - now))
        return super().select(timeout)
