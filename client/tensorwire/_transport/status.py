"""What a failed gRPC call says: its status (grpc.aio's own transport failures read
as UNAVAILABLE), the request id and retry pushback the server sent, which statuses are
worth another attempt, and the backoff before one."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import grpc

from tensorwire.wire.protocol import REQUEST_ID_KEY, RETRY_PUSHBACK_KEY

#: The status codes worth another attempt. UNAVAILABLE means no server took the call
#: (refused, reset, starting up, draining). CANCELLED reaches a client only from the
#: other end: a server (or gRPC inside it) stopping with the call in flight. The
#: client's own cancellations never come back as a status (asyncio raises
#: CancelledError; a closed client raises RuntimeError). Every other status is an
#: answer (a bad request, no memory) or the caller's own limit (DEADLINE_EXCEEDED),
#: which sending again would not change.
RETRY_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

#: Attempts made after the first, by default, when one fails with a RETRY_CODES status.
DEFAULT_RETRIES: Final = 4

#: Backoff before retry n: up to BACKOFF_INITIAL * BACKOFF_MULTIPLIER**(n-1) seconds,
#: never more than BACKOFF_MAX (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2, ...).
BACKOFF_INITIAL: Final = 0.05
BACKOFF_MULTIPLIER: Final = 2.0
BACKOFF_MAX: Final = 2.0


def backoff(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...), with "full jitter":
    uniform below the exponential ceiling, so that clients cut off together by one
    failure do not all come back at the same instant."""
    ceiling = BACKOFF_INITIAL * BACKOFF_MULTIPLIER ** min(max(retry - 1, 0), 64)
    return rand() * min(BACKOFF_MAX, ceiling)


# What grpc.aio reports when one of its own batch operations fails, e.g. sending on a
# connection the server's process dropped (grpc's cygrpc ``set_internal_error``). No
# server said it: it is the transport breaking, so it is read as UNAVAILABLE.
_CORE_FAILURE: Final = "Internal error from Core"


def _core_failure(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    return code is grpc.StatusCode.INTERNAL and details == _CORE_FAILURE


def status_code(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status ``exc``'s call ended with (UNKNOWN when it names none)."""
    # grpc.Call (sync) and grpc.aio.AioRpcError share code() and details() but no base.
    if _core_failure(exc):
        return grpc.StatusCode.UNAVAILABLE
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def status_details(exc: grpc.RpcError) -> str:
    """What ``exc``'s status says, for the error the caller sees."""
    if _core_failure(exc):
        return "the connection to the server broke during the call"
    return (exc.details() if hasattr(exc, "details") else None) or str(exc)


def _metadata(exc: grpc.RpcError, wanted: str) -> str | None:
    """The value of metadata key ``wanted`` the server ended ``exc``'s call with: in its
    trailing metadata, else its initial metadata; None when no server sent it."""
    for which in ("trailing_metadata", "initial_metadata"):
        read = getattr(exc, which, None)
        if read is None:
            continue
        try:
            metadata = read()
        except Exception:  # a call that never started has none to give
            continue
        for key, value in metadata or ():
            if key == wanted:
                return value.decode() if isinstance(value, bytes) else str(value)
    return None


def request_id(exc: grpc.RpcError) -> str | None:
    """The ``x-request-id`` the server answered ``exc``'s call with; None when no
    server answered."""
    return _metadata(exc, REQUEST_ID_KEY)


def pushback(exc: grpc.RpcError) -> float | None:
    """Seconds the server asked to wait before trying ``exc``'s call again (gRPC's
    server pushback), when it answered UNAVAILABLE without running it; else None."""
    if status_code(exc) is not grpc.StatusCode.UNAVAILABLE:
        return None
    value = _metadata(exc, RETRY_PUSHBACK_KEY)
    if value is None or not value.isdigit():  # gRFC A6: a negative or bad one means "don't"
        return None
    return min(int(value) / 1000, BACKOFF_MAX)
