"""What each model version has done: requests, forward passes, batch sizes, time."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StatsSnapshot:
    """One version's counters at one moment (ModelStatistics reports these)."""

    model: str
    version: int
    requests: int
    failures: int
    inferences: int
    executions: int
    queue_seconds: float
    compute_seconds: float
    batch_sizes: dict[int, int] = field(default_factory=dict)
    rejected: int = 0
    expired: int = 0


class VersionStats:
    """Counters of one model version, updated from many threads at once."""

    def __init__(self, model: str, version: int) -> None:
        self.model = model
        self.version = version
        self._lock = threading.Lock()
        self._requests = 0
        self._failures = 0
        self._inferences = 0
        self._executions = 0
        self._queue = 0.0
        self._compute = 0.0
        self._batches: Counter[int] = Counter()
        self._rejected = 0
        self._expired = 0

    def executed(self, rows: int, seconds: float) -> None:
        """One forward (or forward and backward) pass over ``rows`` rows."""
        with self._lock:
            self._executions += 1
            self._inferences += rows
            self._compute += seconds
            self._batches[rows] += 1

    def ran(self, rows: int, seconds: float, ok: bool) -> None:
        """``executed`` and ``answered`` of one request's own pass, under one lock."""
        with self._lock:
            self._executions += 1
            self._inferences += rows
            self._compute += seconds
            self._batches[rows] += 1
            self._requests += 1
            self._failures += not ok

    def answered(self, ok: bool, queued: float = 0.0) -> None:
        """One request answered, after ``queued`` seconds in the model's queue."""
        with self._lock:
            self._requests += 1
            self._failures += not ok
            self._queue += queued

    def rejected(self) -> None:
        """One request refused: the model's queue was full."""
        with self._lock:
            self._requests += 1
            self._failures += 1
            self._rejected += 1

    def expired(self, queued: float) -> None:
        """One request whose deadline passed while it waited in the queue."""
        with self._lock:
            self._requests += 1
            self._failures += 1
            self._expired += 1
            self._queue += queued

    def snapshot(self) -> StatsSnapshot:
        """The counters now."""
        with self._lock:
            return StatsSnapshot(
                self.model,
                self.version,
                self._requests,
                self._failures,
                self._inferences,
                self._executions,
                self._queue,
                self._compute,
                dict(sorted(self._batches.items())),
                self._rejected,
                self._expired,
            )
