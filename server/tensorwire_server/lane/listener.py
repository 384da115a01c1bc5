"""The fast lane's listener: small calls as frames (tensorwire/wire/lane.py) on
connections the data port hands over, served on the event loop through the SAME gate
and handlers as gRPC's calls.

The data port's thread reads a connection's plain-text opening; a lane's it hands to
``LaneServer.adopt``, which serves it on the loop (TLS there when the server has it).
On Linux the lane also listens on an abstract Unix stream socket of its own (a random
name, which grants carry): a client on this host connects there, skipping loopback
TCP, and its connection is read on the loop from its first byte, opening included.
The connection presents a grant (grants.py) and then sends calls. Each call is looked
up in the server's own gRPC handlers, wrapped by the ``Gate`` exactly as gRPC's
interceptor wraps it, and run with a ``LaneContext`` (context.py) in place of
gRPC's: the same lifecycle, scope and admission checks, deadline, request id, metrics,
access log and status mapping, with the grant's identity standing for a token. Its
answer goes back as a frame with the same status code and message.

Each connection is a ``LaneConnection`` (connection.py). Bounded here: connections
(``max_connections``, the idlest replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple

import grpc

from tensorwire.wire.lane import LOCAL_SEND_BUFFER, MAX_METHOD
from tensorwire_server.eviction import victim
from tensorwire_server.lane.connection import (
    DIRECT_BYTES,
    HELLO_SECONDS,
    MAX_IN_FLIGHT,
    LaneConnection,
)
from tensorwire_server.lane.grants import Grants
from tensorwire_server.transport.security import Identity

__all__ = ["HELLO_SECONDS", "MAX_IN_FLIGHT", "LaneConnection", "LaneServer"]

log = logging.getLogger(__name__)

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
        warm: Callable[[], None] = lambda: None,
    ) -> None:
        """``intercept``: the gate's ``intercept_service``; ``handlers``: the server's
        generic handlers, in the order gRPC asks them; ``port``: the data port's;
        ``local``: listen on an abstract Unix socket too (Linux), for this host's
        clients; ``warm``: told of each answer (the loop's SpinningSelector)."""
        self.warm = warm
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
        #: Where every connection's reads land first: one for all, as the loop reads
        #: into it and the connection parses it out before it reads another.
        self.scratch = memoryview(bytearray(DIRECT_BYTES))
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
            with contextlib.suppress(OSError):  # an answer up to 4 MiB in one send
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SEND_BUFFER)
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
