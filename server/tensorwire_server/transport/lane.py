"""The fast lane's server: small calls as frames (tensorwire/wire/lane.py) on
connections the data port hands over, served on the event loop through the SAME gate
and handlers as gRPC's calls.

The data port's thread reads a connection's plain-text opening; a lane's it hands to
``LaneServer.adopt``, which serves it on the loop (TLS there when the server has it).
On Linux the lane also listens on an abstract Unix stream socket of its own (a random
name, which grants carry): a client on this host connects there, skipping loopback
TCP, and its connection is read on the loop from its first byte, opening included.
The connection presents a grant (grants.py) and then sends calls. Each call is looked
up in the server's own gRPC handlers, wrapped by the ``Gate`` exactly as gRPC's
interceptor wraps it, and run with a ``LaneContext`` (lane_context.py) in place of
gRPC's: the same lifecycle, scope and admission checks, deadline, request id, metrics,
access log and status mapping, with the grant's identity standing for a token. Its
answer goes back as a frame with the same status code and message.

Bounded: connections (``max_connections``, the idlest replaced), calls in flight per
connection (reading pauses past MAX_IN_FLIGHT), frame sizes (``max_request_bytes``),
and the time a connection may take to present its grant or sit idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple

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
from tensorwire_server.eviction import victim
from tensorwire_server.transport.grants import Grant, Grants
from tensorwire_server.transport.lane_context import LaneContext, lane_metadata
from tensorwire_server.transport.security import Identity

log = logging.getLogger(__name__)

#: Seconds a connection has to finish TLS and present its grant.
HELLO_SECONDS: Final = 3.0
#: Seconds a connection may sit idle (no call in flight) before it is closed.
IDLE_SECONDS: Final = 300.0
#: Calls one connection may have in flight before the server stops reading it.
MAX_IN_FLIGHT: Final = 4
#: The largest request frame body the lane takes (the client sends larger requests,
#: and those of the streaming threshold or more, through gRPC): with the connection
#: cap and MAX_IN_FLIGHT, what bounds the bytes lane calls hold before admission.
MAX_LANE_REQUEST: Final = 8 << 20
#: The methods the lane carries: every unary TensorService method but OpenLane itself.
SERVICE: Final = "/tensorwire.v1.TensorService/"
NOT_ON_LANE: Final = frozenset({SERVICE + "OpenLane"})

Handler = Any  # grpc.RpcMethodHandler, as the gate returns it


class _Details(NamedTuple):
    """grpc.HandlerCallDetails, as the gate and generic handlers read it."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class LaneServer:
    """Lane connections, and the handler each of their calls runs."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        intercept: Callable[[Callable[[Any], Awaitable[Any]], Any], Awaitable[Handler]],
        handlers: Sequence[grpc.GenericRpcHandler[Any, Any]],
        grants: Grants,
        tls: ssl.SSLContext | None,
        max_request_bytes: int,
        max_connections: int = 256,
        *,
        port: int,
        local: bool = False,
    ) -> None:
        """``intercept``: the gate's ``intercept_service``; ``handlers``: the server's
        generic handlers, in the order gRPC asks them; ``port``: the data port's;
        ``local``: listen on an abstract Unix socket too (Linux), for this host's
        clients."""
        self.loop = loop
        self.grants = grants
        self.port = port
        self.tls = tls
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self._intercept = intercept
        self._handlers = tuple(handlers)
        self._guarded: dict[str, Handler | None] = {}
        self.connections: set[LaneConnection] = set()
        #: Calls answered on the lane (tests, benchmarks).
        self.answered = 0
        self.closed = False
        #: The abstract Unix socket's name (no leading NUL), which grants carry; "": none.
        self.local_name = ""
        self._local: socket.socket | None = None
        if local and hasattr(socket, "AF_UNIX") and sys.platform == "linux":
            self._local, self.local_name = _listen_local(max(max_connections, 128))
            loop.call_soon_threadsafe(loop.add_reader, self._local.fileno(), self._accept_local)

    def grant(self, identity: Identity | None) -> tuple[bytes, float]:
        """A grant for ``identity``, the one the gate matched the caller's token to
        (None on a server without tokens), and the seconds it stays good. Its identity,
        not its name: two token lines may share a name (rotation) with other scopes."""
        name = identity.name if identity is not None else ""
        return self.grants.issue(identity, name), self.grants.seconds

    def adopt(self, sock: socket.socket) -> None:
        """Serve ``sock`` (its opening read) on the loop; from the data port's thread."""
        try:
            self.loop.call_soon_threadsafe(self._adopt, sock)
        except RuntimeError:  # the loop is closed: the server is stopping
            sock.close()

    def _accept_local(self) -> None:
        """Take the connections waiting on the Unix socket (the loop saw it readable)."""
        listener = self._local
        for _ in range(64):  # then let the loop run: more wait their turn
            if listener is None or self.closed:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the next readiness tries again
                log.warning("fast lane: the Unix socket could not accept: %s", exc)
                return
            self._adopt(sock, local=True)

    def _adopt(self, sock: socket.socket, local: bool = False) -> None:
        if self.closed or not self._room():
            sock.close()
            return
        sock.setblocking(False)
        conn = LaneConnection(self, opening=local)
        self.connections.add(conn)
        self.loop.create_task(self._connect(sock, conn, None if local else self.tls))

    async def _connect(
        self, sock: socket.socket, conn: LaneConnection, tls: ssl.SSLContext | None
    ) -> None:
        try:
            async with asyncio.timeout(HELLO_SECONDS):
                await self.loop.connect_accepted_socket(
                    lambda: conn,
                    sock,
                    ssl=tls,
                    ssl_handshake_timeout=HELLO_SECONDS if tls is not None else None,
                )
        except (OSError, TimeoutError, ssl.SSLError, ValueError):
            self.connections.discard(conn)
            sock.close()

    def _room(self) -> bool:
        """Whether a new connection may be held: past the cap, one goes by the data
        port's rule (eviction.victim; a grant stands for a ticket), or, every one
        busy, the newcomer is refused."""
        if len(self.connections) < self.max_connections:
            return True
        chosen = victim(
            self.connections,
            busy=lambda c: bool(c.calls),
            known=lambda c: c.grant is not None,
            since=lambda c: c.last,
        )
        if chosen is None:
            log.warning("fast lane: refused a connection: all %d are busy", self.max_connections)
            return False
        chosen.close()
        return True

    async def handler(self, method: str) -> Handler | None:
        """The gate-wrapped handler of unary ``method``; None when the lane does not
        carry it (unknown, streaming, or not on the lane)."""
        if method in self._guarded:
            return self._guarded[method]
        found: Handler | None = None
        if method.startswith(SERVICE) and method not in NOT_ON_LANE and len(method) <= MAX_METHOD:
            details = _Details(method, ())

            async def continuation(details: Any) -> Any:
                for generic in self._handlers:
                    handler = generic.service(details)
                    if handler is not None:
                        return handler
                return None

            inner = await continuation(details)
            if inner is not None and not (inner.request_streaming or inner.response_streaming):
                found = await self._intercept(continuation, details)
        if len(self._guarded) < 256:  # names are the client's: keep only so many
            self._guarded[method] = found
        return found

    def _stop_listening(self) -> None:
        """Close the Unix socket (on the loop: its reader goes first)."""
        listener, self._local = self._local, None
        if listener is not None:
            with contextlib.suppress(ValueError, RuntimeError):  # the loop is closing
                self.loop.remove_reader(listener.fileno())
            listener.close()

    def close(self) -> None:
        """Close every connection (their calls are cancelled); accept no more. Each is
        shut down at once, not when the loop next runs: the server may be stopping it."""
        self.closed = True
        self._stop_listening()
        for conn in list(self.connections):
            conn.close(shutdown=True)

    async def drain(self, wait: float = 1.0) -> None:
        """Close every connection once the answers written to it are sent, up to
        ``wait`` seconds (then at once, as ``close``); accept no more. The server's
        stop has let its calls finish: their answers must not be cut off."""
        self.closed = True
        self._stop_listening()
        held = list(self.connections)
        for conn in held:
            conn.finish()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not all(conn.lost for conn in held):
                    await asyncio.sleep(0.01)
        for conn in held:
            if not conn.lost:
                conn.close(shutdown=True)


class LaneConnection(asyncio.Protocol):
    """One lane connection: its grant, its frames, its calls in flight."""

    def __init__(self, server: LaneServer, opening: bool = False) -> None:
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

    def data_received(self, data: bytes) -> None:
        self.buffer += data
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
        """Whether to read and parse no more for now: its answers wait to be sent, or
        it has MAX_IN_FLIGHT calls running (what one read buffered waits its turn)."""
        return self.writing_paused or len(self.calls) >= MAX_IN_FLIGHT

    def _resume(self) -> None:
        """Read again, and parse what is buffered, unless still held."""
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
            if len(buffer) < size:
                return
            with memoryview(buffer) as view:  # one copy, not a slice's and then bytes'
                body = bytes(view[:size])
            del buffer[:size]
            self._pending = None
            self._start(call_id, timeout, method, lane.unpairs(meta), body)

    def _start(
        self, call_id: int, timeout: float, method: str, meta: list[tuple[str, str]], body: bytes
    ) -> None:
        assert self.grant is not None
        context = LaneContext(
            lane_metadata(meta), None if timeout < 0 else timeout, self.grant.identity
        )
        task = self.server.loop.create_task(self._call(call_id, method, body, context))
        self.calls[call_id] = (task, context)
        self.last = time.monotonic()
        if len(self.calls) >= MAX_IN_FLIGHT and self.transport is not None:
            self.transport.pause_reading()

    async def _call(self, call_id: int, method: str, body: bytes, context: LaneContext) -> None:
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
        code, details = context.status()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            meta = lane.pairs(context.trailing)
            pieces = lane.response_frame(call_id, code.value[0], details, meta, response)
            self.server.answered += 1  # before: its client may look at once
            transport.writelines(pieces)
        # Its budgets go once its answer is written, as gRPC's done callback does.
        context.done()
        self.calls.pop(call_id, None)
        self.last = time.monotonic()
        if len(self.calls) < MAX_IN_FLIGHT:  # room again: read, and parse what waits
            self._resume()


async def _one(body: bytes) -> AsyncIterator[bytes]:
    """A unary call's request, as the gate reads it from gRPC: one message."""
    yield body


def _listen_local(backlog: int) -> tuple[socket.socket, str]:
    """A listening, non-blocking abstract Unix stream socket with a random name, and
    the name: it exists only in this network namespace and as long as the server."""
    name = f"tensorwire-lane-{secrets.token_hex(16)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, name
