"""One method call across its attempts: its state, its progress reports, and the
decision after a failed attempt: made again after a backoff, within the deadline, or
the error the caller sees."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import grpc

from tensorwire._transport.status import (
    RETRY_CODES,
    backoff,
    pushback,
    request_id,
    status_code,
    status_details,
)
from tensorwire.errors import TensorwireError, UnavailableError, error_class
from tensorwire.types import Progress, ProgressCallback
from tensorwire.wire.codec import Encoder, Received
from tensorwire.wire.streaming import Advance


class Reporter:
    """Turns byte counts into Progress calls, and keeps the callback's own exception
    so that it, not the cancellation it causes, is what the caller sees."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.error: BaseException | None = None

    def stage(self, stage: Literal["upload", "download"]) -> Advance | None:
        """The Advance callback of one direction of a streamed call (None: no callback)."""
        callback = self.callback
        if callback is None:
            return None

        def advance(done: int, total: int) -> None:
            try:
                callback(Progress(stage, done, total))
            except BaseException as exc:
                self.error = exc
                raise

        return advance

    def whole(self, encoder: Encoder[Any], received: Received[Any]) -> None:
        """Report a unary call, whose bytes move in one piece each way."""
        if self.callback is not None:
            sizes = {"upload": encoder.payload_bytes, "download": received.payload_bytes}
            for stage, size in sizes.items():
                self.callback(Progress(stage, 0, size))  # type: ignore[arg-type]
                self.callback(Progress(stage, size, size))  # type: ignore[arg-type]


class Retry(Exception):
    """Ends an attempt that should be made again after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


@dataclass
class CallState:
    """One method call across its attempts: what it sends and how far it got."""

    method: str
    encoder: Encoder[Any]
    reporter: Reporter
    deadline: float | None
    #: It goes to the ``<method>Stream`` twin: a large request, or a response found
    #: too large for one message (then every later attempt streams too).
    streamed: bool
    attempts: int = 0
    #: The current attempt received response data: it must not be made again.
    responded: bool = False
    #: The details of the last UNAVAILABLE, for the error should a later attempt time out.
    unavailable: str | None = None
    #: The details of the last "not yet, ask again" (pushback) from a starting server.
    starting: str | None = None
    #: Attempts the server pushed back: they count against no retry budget.
    pushed_back: int = 0
    #: The method callables its attempts use (``_methods``, or the pinned replica's).
    methods: dict[str, Any] = field(default_factory=dict)
    #: The call metadata: the client's own, and its session's id when it has one.
    metadata: Any = None
    #: An attempt that reached no server may be made again.
    idempotent: bool = False

    def remaining(self) -> float | None:
        """Seconds left of the whole call's deadline (None: no deadline)."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def retry_or_raise(self, exc: grpc.RpcError, retries: int, target: str) -> NoReturn:
        """Raise Retry when this call may be made again, after a backoff that ends
        before its deadline; else the error ``exc`` maps to (``retries``: the
        client's budget; ``target``: how errors name the server)."""
        wait = None if self.responded else pushback(exc)
        if wait is not None:
            # The server did not run the call and said when to ask again (it is
            # starting): wait for it within the deadline, whatever the retries left
            # and whether the call may be sent twice. A little jitter keeps callers
            # that waited together from all coming back in the same instant.
            self.unavailable = self.starting = status_details(exc)
            self.pushed_back += 1
            delay = wait * (0.8 + 0.4 * random.random())
            if self.deadline is None or time.monotonic() + delay < self.deadline:
                raise Retry(delay)
            raise self.error(exc, target) from exc
        if status_code(exc) in RETRY_CODES:
            self.starting = None  # gone or refusing: no longer a server about to serve
        if (
            status_code(exc) in RETRY_CODES
            and self.idempotent
            and not self.responded  # the server answered in part: it was reached
            and self.attempts - self.pushed_back <= retries
        ):
            self.unavailable = status_details(exc)
            delay = backoff(self.attempts)
            if self.deadline is None or time.monotonic() + delay < self.deadline:
                raise Retry(delay)
        raise self.error(exc, target) from exc

    def error(self, exc: grpc.RpcError, target: str) -> TensorwireError:
        """The tensorwire error ``exc`` maps to, its message naming ``target`` where
        the server could not be reached, and why there were retries at all."""
        code = status_code(exc)
        details = status_details(exc)
        cls = error_class(code.name)
        if code is grpc.StatusCode.UNAVAILABLE and self.starting is not None:
            # Reached, but not serving yet: the deadline ran out while waiting.
            waited = f" (still, after {self.attempts} attempts)" if self.attempts > 1 else ""
            details = f"{target}: {details}{waited}"
        elif code is grpc.StatusCode.UNAVAILABLE:
            details = _unreachable(target, details, self.attempts)
        elif cls is UnavailableError:
            details = f"{target}: {details}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and self.starting is not None:
            details = f"{details} on attempt {self.attempts}, waiting for {target}: {self.starting}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and self.unavailable is not None:
            # The time ran out on a retry: say why there were retries at all.
            before = _unreachable(target, self.unavailable, 1)
            details = f"{details} on attempt {self.attempts}; before it: {before}"
        return cls(details, request_id(exc))


def _unreachable(target: str, details: str, attempts: int) -> str:
    tried = f" (after {attempts} attempts)" if attempts > 1 else ""
    return f"cannot reach tensorwire server at {target}: {details}{tried}"
