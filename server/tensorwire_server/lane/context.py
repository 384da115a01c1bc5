"""A fast-lane call's stand-in for gRPC's servicer context: what the gate, ``guarded``
and ``rpc`` read and set on a call (its metadata, deadline, status, trailing
metadata, done callbacks), and nothing more, so that a lane call runs the very code a
gRPC call runs. ``granted`` carries the identity of the connection's grant, which the
gate takes in place of a bearer token."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

import grpc
import grpc.aio

from tensorwire.wire.protocol import REQUEST_ID_KEY, SESSION_KEY
from tensorwire_server.transport.security import Identity

log = logging.getLogger(__name__)

#: The metadata a lane frame may carry: never ``authorization`` (the grant stands for
#: the token), nothing the gate does not read.
LANE_KEYS: Final = frozenset({REQUEST_ID_KEY, SESSION_KEY, "traceparent", "tracestate"})


def lane_metadata(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The pairs of ``pairs`` a lane call may give the gate (the first of each key)."""
    seen: set[str] = set()
    kept = []
    for key, value in pairs:
        if key in LANE_KEYS and key not in seen:
            seen.add(key)
            kept.append((key, value))
    return tuple(kept)


class LaneContext:
    """What a lane call's handler sees of its call, as grpc.aio's context would say it."""

    __slots__ = (
        "_callbacks",
        "_cancelled",
        "_code",
        "_deadline",
        "_details",
        "_ended",
        "granted",
        "metadata",
        "trailing",
    )

    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
        granted: Identity | None,
    ) -> None:
        self.metadata = metadata
        #: The grant's identity (None: a server without tokens).
        self.granted = granted
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.trailing: tuple[tuple[str, str], ...] = ()
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._callbacks: list[Callable[[Any], None]] = []
        self._cancelled = False
        self._ended = False

    # ------------------------------------------------ what the gate and handlers call

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass  # unary calls only: their ids travel in the trailing metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing = tuple((str(k), str(v)) for k, v in metadata)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> NoReturn:
        self.set_code(code, details)
        raise grpc.aio.AbortError(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def cancelled(self) -> bool:
        return self._cancelled

    # ------------------------------------------------ what the lane calls

    def set_code(self, code: grpc.StatusCode, details: str) -> None:
        """The call's status (the first one set holds, as gRPC's abort does)."""
        if self._code is None:
            self._code, self._details = code, details

    def status(self) -> tuple[grpc.StatusCode, str]:
        """The status to answer with; UNKNOWN if the handler set none."""
        return self._code or grpc.StatusCode.UNKNOWN, self._details

    def cancel(self) -> None:
        """Its client went (the connection closed)."""
        self._cancelled = True

    def done(self) -> None:
        """The call is over, answered or not: its done callbacks run, once."""
        if self._ended:
            return
        self._ended = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback(self)
