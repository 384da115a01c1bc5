"""Flows: each client method written once, as a generator that both twins drive.

A flow yields operations and receives their results (httpx's ``auth_flow`` is the
model): ``Send`` makes one call of a TensorService method, through every retry, and
gets back the decoded response, or has the call's exception thrown in; ``Locked`` runs
a sub-flow while the client holds its session lock. What the flow returns is the
method's result. ``Client`` drives flows with blocking calls and ``AsyncClient`` with
awaits; nothing else about a method differs between them, so multi-request protocols
(sessions: open lazily, carry the id, free what garbage collection queued) live in
one place.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from tensorwire.types import ProgressCallback, Timeout
from tensorwire.wire.codec import Encoder

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Route:
    """How a call travels: the method callables (a replica's), its metadata, whether
    it may be made again (None: as METHODS says), and whether to stream at once (a
    response known to be large)."""

    methods: dict[str, Any]
    metadata: Any
    idempotent: bool | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    """Make one call of ``method``: ``encoder``'s request, within ``timeout`` (every
    attempt and backoff), reporting to ``progress``; ``route`` None: the client's own
    channel and metadata, retried as METHODS says."""

    method: str
    encoder: Encoder[Any]
    timeout: Timeout
    progress: ProgressCallback | None = None
    route: Route | None = None


@dataclass(frozen=True, slots=True)
class Locked:
    """Run ``flow`` holding the client's session lock; its result is sent back."""

    flow: Flow[Any]


#: A flow returning T: it yields Send and Locked operations and receives their results.
Flow = Generator[Send | Locked, Any, T]
