"""One fast-lane connection (connection.py): its opening and grant, its frames (the
format: tensorwire/wire/lane.py), its calls in flight, and their answers. Each call
runs the gate-wrapped handler its listener found (listener.py) with a ``LaneContext``
(context.py) in place of gRPC's.

Bounded: calls in flight per connection (reading pauses past MAX_IN_FLIGHT), frame
sizes (the listener's ``max_request_bytes``), and the time a connection may take to
present its grant or sit idle; a client that does not read its answers is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, Final, Protocol

import grpc

from tensorwire.wire import lane
from tensorwire.wire.lane import (
    ACCEPTED,
    HELLO,
    HELLO_MAGIC,
    MAX_METADATA,
    MAX_METHOD,
    OPENING,
    REQUEST,
    REQUEST_MAGIC,
)
from tensorwire_server.lane.context import LaneContext, lane_metadata
from tensorwire_server.lane.grants import Grant, Grants

log = logging.getLogger(__name__)

#: Seconds a connection has to finish TLS and present its grant.
HELLO_SECONDS: Final = 3.0
#: Seconds a connection may sit idle (no call in flight) before it is closed.
IDLE_SECONDS: Final = 300.0
#: Calls one connection may have in flight before the server stops reading it.
MAX_IN_FLIGHT: Final = 4
#: Calls one turn of the loop starts on a connection (one read, one resumption): the
#: calls answered in their first step (``_start``) would otherwise let a client that
#: sends many frames at once hold the loop from every other connection.
TURN_CALLS: Final = MAX_IN_FLIGHT
#: Bodies from this size on are read straight into a buffer of their own (the kernel's
#: one copy), and answers from this size on are written without being joined to their
#: head: smaller ones are cheaper copied than given a system call of their own.
DIRECT_BYTES: Final = 64 << 10


class Listener(Protocol):
    """What a connection needs of the listener that holds it (listener.LaneServer)."""

    loop: asyncio.AbstractEventLoop
    grants: Grants
    max_request_bytes: int
    connections: set[LaneConnection]
    #: Where every connection's reads land first (one for all: see LaneServer).
    scratch: memoryview
    answered: int

    async def handler(self, method: str) -> Any:
        """The gate-wrapped handler of ``method``; None: not on the lane."""

    def warm(self) -> None:
        """A call was answered (the event loop polls a moment: lane/spin.py)."""


class LaneConnection(asyncio.BufferedProtocol):
    """One lane connection: its grant, its frames, its calls in flight.

    Bytes arrive in a scratch buffer and are parsed from ``buffer``; a body of
    DIRECT_BYTES or more is read by the kernel straight into a buffer of its own
    (``get_buffer``), which the call's request then is: no copy in Python."""

    def __init__(self, server: Listener, opening: bool = False) -> None:
        """``opening``: its first bytes are the lane's OPENING, still to be read (a
        Unix socket's; the data port's thread read a TCP connection's)."""
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.grant: Grant | None = None
        self.opening = opening
        #: A Unix socket's connection (the server proves itself after ACCEPTED).
        self.local = opening
        self.buffer = bytearray()
        #: Calls in flight, by id, with their contexts.
        self.calls: dict[int, tuple[asyncio.Task[None], LaneContext]] = {}
        self.last = time.monotonic()
        #: The transport holds more unsent bytes than its high-water mark: the client
        #: is not reading its answers (or pongs), so nothing more is read or parsed.
        self.writing_paused = False
        self.gone = False
        #: Its transport is closed for good (connection_lost ran).
        self.lost = False
        self._timer: asyncio.TimerHandle | None = None
        self._pending: tuple[int, float, str, bytes, int] | None = None  # a frame's head
        #: A large body being read into its own buffer, and the bytes it holds so far.
        self._body: bytearray | None = None
        self._filled = 0
        #: A call's first step runs now (``_start``): its answer must not parse.
        self._eager = False
        #: Calls started in this turn of the loop (TURN_CALLS).
        self._turn = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.gone:  # evicted while it was being set up
            transport.abort()  # type: ignore[attr-defined]
            return
        self._arm(HELLO_SECONDS)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        for task, context in list(self.calls.values()):
            context.cancel()
            task.cancel()  # its client went: stop its work, as gRPC does
        self.buffer = bytearray()
        self._body = None

    def close(self, shutdown: bool = False) -> None:
        """Close it now; it no longer counts against the server's connections.
        ``shutdown``: its socket too, at once (the client hears it even if the loop
        stops before the transport's own close runs)."""
        self.gone = True
        self.server.connections.discard(self)
        if self.transport is None:
            return
        if shutdown:
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.shutdown(socket.SHUT_RDWR)
        self.transport.abort()

    def finish(self) -> None:
        """Close it once what was written to it is sent; it reads nothing more."""
        self.gone = True
        self.server.connections.discard(self)
        if self.transport is None:
            self.lost = True  # connection_made will close it, and nothing was written
            return
        self.transport.close()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.server.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        # Idle is since its last call began or ended, not since its grant: a busy
        # connection lives on between its calls.
        idle = time.monotonic() - self.last
        if self.grant is None or (not self.calls and idle >= IDLE_SECONDS):
            self.close()  # no grant in time, or idle too long
        else:
            self._arm(IDLE_SECONDS if self.calls else IDLE_SECONDS - idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        body = self._body
        if body is not None:  # no more than the body: the next frame waits in the socket
            return memoryview(body)[self._filled :]
        return self.server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        self._turn = 0
        if self._body is not None:
            self._filled += nbytes
        else:
            self.buffer += self.server.scratch[:nbytes]
        self._parse()

    def pause_writing(self) -> None:
        # A client that sends and never reads would grow the transport's buffer
        # without bound: stop reading it (its sends then block) until it drains.
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._resume()

    def _held(self) -> bool:
        """Whether to read and parse no more for now: its answers wait to be sent, it
        has MAX_IN_FLIGHT calls running, or it started TURN_CALLS in this turn of the
        loop (what one read buffered waits its turn)."""
        calls = len(self.calls)
        return self.writing_paused or calls >= MAX_IN_FLIGHT or self._turn >= TURN_CALLS

    def _resume(self) -> None:
        """Read again, and parse what is buffered, unless still held."""
        self._turn = 0
        transport = self.transport
        if self._held() or transport is None or transport.is_closing():
            return
        transport.resume_reading()
        self._parse()

    def _parse(self) -> None:
        """Parse and start what is buffered; a malformed frame closes the connection."""
        try:
            self._frames()
        except lane.LaneError as exc:
            log.debug("fast lane: closed a connection: %s", exc)
            self.close()

    def _frames(self) -> None:
        buffer = self.buffer
        while self.transport is not None and not self.transport.is_closing():
            if self._held():
                return
            if self.opening:
                if len(buffer) < len(OPENING):
                    return
                if buffer[: len(OPENING)] != OPENING:
                    raise lane.LaneError("not a lane connection")
                del buffer[: len(OPENING)]
                self.opening = False
            if self.grant is None:
                if len(buffer) < HELLO.size:
                    return
                magic, grant = HELLO.unpack_from(buffer)
                del buffer[: HELLO.size]
                claimed = self.server.grants.claim(grant) if magic == HELLO_MAGIC else None
                if claimed is None:
                    raise lane.LaneError("no live grant")
                self.grant = claimed
                if self.local:  # the client checks it reached the server that granted
                    self.transport.write(ACCEPTED + self.server.grants.proof(grant))
                else:
                    self.transport.write(ACCEPTED)
                self._arm(IDLE_SECONDS)
                continue
            if self._pending is None:
                if len(buffer) < REQUEST.size:
                    return
                magic, call_id, timeout, m, d, b = REQUEST.unpack_from(buffer)
                if magic == lane.PING_MAGIC:  # a client waiting long: still here
                    del buffer[: REQUEST.size]
                    self.transport.write(lane.PONG)
                    continue
                if magic != REQUEST_MAGIC or m > MAX_METHOD or d > MAX_METADATA:
                    raise lane.LaneError("not a request frame")
                if b > self.server.max_request_bytes:
                    raise lane.LaneError(f"a {b}-byte request, past the lane's limit")
                if call_id in self.calls:
                    raise lane.LaneError("a call id already in flight")
                head = REQUEST.size + m + d
                if len(buffer) < head:
                    return
                method = bytes(buffer[REQUEST.size : REQUEST.size + m]).decode("ascii", "replace")
                meta = bytes(buffer[REQUEST.size + m : head])
                del buffer[:head]
                self._pending = (call_id, timeout, method, meta, b)
            call_id, timeout, method, meta, size = self._pending
            body: bytes | bytearray
            if self._body is not None:  # read by the kernel into its own buffer
                if self._filled < size:
                    return
                body, self._body = self._body, None
            elif len(buffer) < size:
                # The rest straight into a buffer of its own, once a quarter came: a
                # head alone (a few bytes) allocates nothing, so a caller holds at
                # most four times what it sent (and never past max_request_bytes).
                if size >= DIRECT_BYTES and len(buffer) >= size // 4:
                    self._body = bytearray(size)
                    self._body[: len(buffer)] = buffer
                    self._filled = len(buffer)
                    buffer.clear()
                return
            else:
                with memoryview(buffer) as view:  # one copy, not a slice's and then bytes'
                    body = bytes(view[:size])
                del buffer[:size]
            self._pending = None
            self._start(call_id, timeout, method, lane.unpairs(meta), body)

    def _start(
        self,
        call_id: int,
        timeout: float,
        method: str,
        meta: list[tuple[str, str]],
        body: bytes | bytearray,
    ) -> None:
        assert self.grant is not None
        context = LaneContext(
            lane_metadata(meta), None if timeout < 0 else timeout, self.grant.identity
        )
        self.last = time.monotonic()
        self._turn += 1
        if self._turn >= TURN_CALLS and self.transport is not None:
            # Its turn is up: what else it sent waits for the loop's next turn.
            self.transport.pause_reading()
            self.server.loop.call_soon(self._resume)
        call = self._call(call_id, method, body, context)
        # Its first step now, in a context of its own as a task's would be: a call
        # that does not wait (a small one, Compute running it on the loop) is answered
        # before this returns, without another turn of the loop (~15-20 µs of a small
        # call's server side on the VM). One that waits (a batch, a worker thread)
        # goes on as a task from where it is.
        steps = contextvars.copy_context()
        self._eager = True
        try:
            if sys.version_info >= (3, 12):  # asyncio's own: the task is current
                task: asyncio.Task[None] = asyncio.Task(
                    call, loop=self.server.loop, context=steps, eager_start=True
                )
                if task.done():
                    return
            else:
                # Python 3.11, by hand: no task is current in this first step, so
                # code that runs in it must not ask for one (asyncio.timeout does;
                # 3.11's wait_for does not, and is the only wait on the lane's paths).
                try:
                    awaited = steps.run(call.send, None)
                except StopIteration:
                    return
                task = self.server.loop.create_task(_Started(call, awaited), context=steps)
        finally:
            self._eager = False
        self.calls[call_id] = (task, context)
        if len(self.calls) >= MAX_IN_FLIGHT and self.transport is not None:
            self.transport.pause_reading()

    async def _call(
        self, call_id: int, method: str, body: bytes | bytearray, context: LaneContext
    ) -> None:
        response = b""
        try:
            handler = await self.server.handler(method)
            if handler is None:
                context.set_code(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not on the lane")
            else:
                result = await handler.stream_unary(_one(body), context)
                del body
                serialize = handler.response_serializer
                response = result if serialize is None else serialize(result)
                context.set_code(grpc.StatusCode.OK, "")
        except grpc.aio.AbortError:
            pass  # the context has the status abort gave it
        except asyncio.CancelledError:
            context.cancel()
            context.done()
            raise
        except Exception:
            log.exception("fast lane: %s failed with a server error", method)
            context.set_code(grpc.StatusCode.INTERNAL, f"{method}: internal server error")
        self._answer(call_id, context, response)

    def _answer(self, call_id: int, context: LaneContext, response: bytes) -> None:
        try:
            code, details = context.status()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                meta = lane.pairs(context.trailing)
                head, body = lane.response_frame(call_id, code.value[0], details, meta, response)
                self.server.answered += 1  # before: its client may look at once
                if len(body) < DIRECT_BYTES:
                    transport.write(head + body)  # one system call
                else:  # not joined (writelines would): a copy of the whole answer saved
                    transport.write(head)
                    transport.write(body)
                self.server.warm()  # the caller's next call may come at once
        finally:
            # Its budgets go once its answer is written (as gRPC's done callback
            # does), however the writing went.
            context.done()
        self.calls.pop(call_id, None)
        self.last = time.monotonic()
        # Room again: read, and parse what waits (an eager call's own parse goes on
        # once it returns: parsing here would recurse, once per frame).
        if len(self.calls) < MAX_IN_FLIGHT and not self._eager:
            self._resume()


class _Started(Coroutine[Any, Any, None]):
    """The rest of a call's coroutine whose first step ran eagerly and stopped at
    ``awaited``, for a task to drive: the task's first step is handed ``awaited``, as
    if the coroutine had just yielded it; everything after goes to the coroutine. A
    task cancelled before its first step throws into the coroutine where it waits."""

    __slots__ = ("_awaited", "_call", "_fresh")

    def __init__(self, call: Coroutine[Any, Any, None], awaited: Any) -> None:
        self._call, self._awaited, self._fresh = call, awaited, True

    def send(self, value: Any) -> Any:
        if self._fresh:
            self._fresh = False
            awaited, self._awaited = self._awaited, None
            return awaited
        return self._call.send(value)

    def throw(self, *exc: Any) -> Any:
        self._fresh = False
        self._awaited = None
        return self._call.throw(*exc)

    def close(self) -> None:
        self._call.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a started call is driven by its task, not awaited")


async def _one(body: bytes | bytearray) -> AsyncIterator[bytes | bytearray]:
    """A unary call's request, as the gate reads it from gRPC: one message."""
    yield body
