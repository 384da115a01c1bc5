"""gRPC plumbing both services share, on grpc.aio: the one error mapping, the shape of
their handlers, the one-message limit of a unary response, and the call's deadline."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeAlias, TypeVar

import grpc
import grpc.aio

from tensorwire.errors import OutOfRangeError, TensorwireError
from tensorwire_server import calls
from tensorwire_server.transport.executor import Compute

log = logging.getLogger(__name__)

R = TypeVar("R")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
#: A unary method's handler: the deserialized request (or the deserializer's error, see
#: ``unary``) and the call's context in, the response out.
Unary: TypeAlias = Callable[[Any, Context], Awaitable[R]]
#: A bidirectionally streaming method's handler: requests in, serialized responses out.
Streaming: TypeAlias = Callable[[AsyncIterator[Any], Context], AsyncIterator[bytes]]

#: Payload bytes a unary response may hold: protobuf caps a message at 2 GiB - 1, and
#: the rest of the message needs room too. Larger responses go through a stream.
UNARY_LIMIT: Final = 2**31 - 2**20
#: gRPC reports a call without a deadline as one centuries away: anything further off
#: than this is no deadline at all.
_CENTURY: Final = 100 * 365 * 86400.0


@asynccontextmanager
async def statuses(method: str, context: Context) -> AsyncIterator[None]:
    """The one error mapping: tensorwire errors become their status with their message;
    anything else is a server bug, logged with its traceback and answered INTERNAL."""
    try:
        yield
    except grpc.aio.AbortError:
        raise  # the call already has its status
    except Exception as exc:
        await failed(method, context, exc)


async def failed(method: str, context: Context, exc: Exception) -> None:
    """``statuses``' mapping of ``exc`` (not an AbortError), for handlers that catch it
    themselves (a small call's path: the context manager costs a few µs a call);
    raises AbortError."""
    if isinstance(exc, TensorwireError):
        # The caller's mistake, not the server's: debug level, no traceback.
        log.debug("%s: %s %s", method, exc.code, exc.message)
        await abort(context, grpc.StatusCode[exc.code], clip(exc.message))
    else:
        log.error("%s failed with a server error", method, exc_info=exc)
        await abort(context, grpc.StatusCode.INTERNAL, f"{method}: internal server error")


async def abort(context: Context, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code``: recorded first, then sent (grpc.aio sends the
    status at once, before the handler's own cleanup runs); raises AbortError."""
    call = calls.current()
    if call is not None and call.record is not None:
        call.record(code.name)
    await context.abort(code, message)


def clip(message: str, limit: int = 2000) -> str:
    """``message`` short enough to travel: a status past gRPC's metadata limit (about
    8 KiB, after escaping) would reach the client as a different error altogether."""
    if len(message.encode()) <= limit:
        return message
    cut = message.encode()[:limit].decode(errors="ignore")
    return f"{cut}... ({len(message)} characters)"


def unary(
    method: str,
    behavior: Callable[[Any], R],
    compute: Compute | None,
    prepare: Callable[[Any], Hashable | None] | None = None,
) -> Unary[R]:
    """The handler of unary ``method``: ``behavior``'s answer, through ``compute`` (None:
    on the loop, for what only reads the server's state), its errors mapped by
    ``statuses``. ``prepare``, on the loop first, checks and records the request and
    names the kind of work it is, which Compute measures to place it (None: always on
    a thread). Our deserializers return a malformed request's error instead of raising
    it (gRPC would answer that with an opaque status): it is raised here."""

    async def handle(request: Any, context: Context) -> R:
        try:  # statuses, written out
            if isinstance(request, TensorwireError):
                raise request
            kind = None if prepare is None else prepare(request)
            if compute is None:
                return behavior(request)
            return await compute.run(behavior, request, kind=kind)
        except grpc.aio.AbortError:
            raise  # the call already has its status
        except Exception as exc:
            await failed(method, context, exc)
        raise AssertionError("unreachable")  # failed aborts, and abort raises

    return handle


def one_message(payload_bytes: int, limit: int, stream: str) -> None:
    """OUT_OF_RANGE for a unary response of more than ``limit`` payload bytes, naming
    the ``stream`` method that carries it."""
    if payload_bytes > limit:
        raise OutOfRangeError(
            f"the response holds {payload_bytes} payload bytes, more than one message "
            f"carries; {stream} streams it"
        )


def remaining(context: Context) -> float | None:
    """Seconds until the call's deadline; None when the caller set none."""
    seconds: float | None = context.time_remaining()
    return None if seconds is None or seconds > _CENTURY else seconds


def cancelled(method: str, exc: BaseException) -> None:
    """Let go of a stream whose client cancelled or went away: nobody is left to answer.
    gRPC keeps the exception in the call's state, so its traceback (and the frames
    holding the request's payloads) must not stay alive."""
    exc.__traceback__ = None
    log.debug("%s: the stream was cancelled", method)
