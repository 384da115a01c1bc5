"""When to add a replica and when to take one away, from tensorwire's own load: the
calls each replica holds (running and queued for a worker thread)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scaling:
    """The fleet's bounds and how it moves between them."""

    #: Replicas always kept (while the cluster has room for them).
    minimum: int = 1
    #: Replicas never exceeded.
    maximum: int = 1
    #: Calls per replica (running + queued) the fleet aims at: more, for ``up_seconds``
    #: on end, adds a replica.
    target_load: float = 8.0
    #: Seconds the load must stay above target before a replica is added.
    up_seconds: float = 3.0
    #: Seconds the load must fit in one replica fewer (at half the target each) before
    #: one is taken away, drained first.
    down_seconds: float = 30.0

    def __post_init__(self) -> None:
        # At least one: the fleet scales on its replicas' load, and none reads none.
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(
                f"replicas: need 1 <= --replicas <= --max-replicas "
                f"(got {self.minimum}..{self.maximum})"
            )
        if self.target_load <= 0 or self.up_seconds < 0 or self.down_seconds < 0:
            raise ValueError("target load must be positive and the waits not negative")


class Autoscaler:
    """Turns a series of load readings into decisions: +1, -1 or 0 replicas."""

    def __init__(self, scaling: Scaling) -> None:
        self.scaling = scaling
        self._above_since: float | None = None
        self._below_since: float | None = None

    def decide(self, now: float, replicas: int, total_load: float) -> int:
        """The change to make now, given ``replicas`` serving that hold
        ``total_load`` calls together; the bounds always win."""
        s = self.scaling
        if replicas < s.minimum:
            return 1
        if replicas > s.maximum:
            return -1
        per = total_load / replicas if replicas else float("inf")
        high = per > s.target_load and replicas < s.maximum
        low = replicas > s.minimum and total_load <= s.target_load * (replicas - 1) / 2
        self._above_since = _since(self._above_since, now) if high else None
        self._below_since = _since(self._below_since, now) if low else None
        if self._above_since is not None and now - self._above_since >= s.up_seconds:
            self._above_since = None
            return 1
        if self._below_since is not None and now - self._below_since >= s.down_seconds:
            self._below_since = None
            return -1
        return 0


def _since(began: float | None, now: float) -> float:
    return now if began is None else began
