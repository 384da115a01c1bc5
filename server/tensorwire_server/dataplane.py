"""The server's data plane: a TCP listener beside gRPC that moves streamed payloads
with ``recv_into`` and ``sendall`` (the format: tensorwire/wire/dataplane.py).

A streamed call asks for a transfer; the handler allocates the request's buffers
from its header as ever (within the limits), then ``issue``\\ s a ticket for them.
A data connection that presents a live ticket claims it (once) and its bytes land
straight in those buffers; any other first bytes (a wrong magic, an unknown,
expired or used ticket) close the connection before anything is allocated. The
handler computes, sends the response's header over gRPC, and ``reply`` hands the
response's payloads to the connection, which sends them and takes the next ticket.

Each connection has a thread of its own: a blocking ``recv_into`` runs at the
kernel's speed with the GIL released, where the event loop would wake up for every
few hundred KiB. Connections are few (clients pool them) and bounded.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Final

from tensorwire.errors import ResourceExhaustedError
from tensorwire.wire import dataplane
from tensorwire.wire.dataplane import (
    ACCEPTED,
    REQUEST,
    REQUEST_MAGIC,
    RESPONSE,
    RESPONSE_MAGIC,
)
from tensorwire.wire.streaming import StreamReceiver

log = logging.getLogger(__name__)

#: Seconds a ticket may wait for its connection: a client connects at once.
TICKET_SECONDS: Final = 10.0
#: Seconds a pooled connection may sit idle between transfers.
IDLE_SECONDS: Final = 300.0
#: Seconds a new connection has to present its first ticket.
HELLO_SECONDS: Final = 10.0


@dataclass(eq=False)
class Transfer:
    """One streamed request's trip over the data plane."""

    ticket: bytes
    receiver: StreamReceiver[Any]
    #: The plane that issued it, and the port its connection comes to.
    plane: DataPlane
    expires: float
    #: Seconds the payload may take to arrive once claimed (the stream limit).
    stall_seconds: float
    #: Set when a connection presents the ticket.
    claimed: Future[None] = field(default_factory=Future)
    #: Set when every payload byte has landed (or the connection failed).
    arrived: Future[None] = field(default_factory=Future)
    #: Set by the handler: the response's payloads to send, or None (close instead).
    reply: Future[list[memoryview] | None] = field(default_factory=Future)
    #: Set when the response's payloads are sent (or sending failed).
    sent: Future[None] = field(default_factory=Future)

    #: The connection that claimed it, while it carries the transfer.
    sock: socket.socket | None = None

    def abandon(self) -> None:
        """The call ended without an answer (failed, cancelled, past its deadline):
        close the connection, so that a transfer still arriving stops at once and
        lets go of the request's buffers."""
        self.answer(None)
        sock = self.sock  # set only while the payload arrives
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def port(self) -> int:
        """The data port the ticket is presented on."""
        return self.plane.port

    def revoke(self) -> bool:
        """Withdraw the ticket; whether no connection had claimed it."""
        return self.plane.revoke(self)

    def answer(self, payloads: list[memoryview] | None) -> None:
        """Hand the connection the response's payloads, or None: close it (the call
        failed; the client drops the connection too). Only the first answer counts."""
        if not self.reply.done():
            self.reply.set_result(payloads)


class DataPlane:
    """The listener, its connections and the tickets they may present."""

    def __init__(
        self, host: str, port: int, tls: ssl.SSLContext | None = None, max_connections: int = 64
    ) -> None:
        #: The server's TLS, when gRPC has it: the data plane is never plainer.
        self.tls = tls
        self.max_connections = max_connections
        self._tickets: dict[bytes, Transfer] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        #: Transfers completed, and the payload bytes they moved (both directions).
        self.transfers = 0
        self.bytes = 0
        self._closed = False
        self._listener = socket.create_server(
            (host, port), family=_family(host), backlog=max_connections
        )
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="tensorwire-data", daemon=True)

    def start(self) -> None:
        """Accept connections."""
        self._thread.start()

    def close(self) -> None:
        """Stop listening and cut every connection (transfers in flight fail)."""
        self._closed = True
        with self._lock:
            connections = list(self._connections)
            self._tickets.clear()
        for sock in [self._listener, *connections]:
            with contextlib.suppress(OSError):  # not connected, or already gone
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread.ident is not None:  # started
            self._thread.join(5)

    def issue(self, receiver: StreamReceiver[Any], stall_seconds: float) -> Transfer:
        """A ticket for ``receiver``'s payloads; RESOURCE_EXHAUSTED when as many
        transfers wait for their connection as connections are allowed."""
        now = time.monotonic()
        transfer = Transfer(
            secrets.token_bytes(dataplane.TICKET_BYTES),
            receiver,
            self,
            now + TICKET_SECONDS,
            stall_seconds,
        )
        with self._lock:
            for ticket, old in list(self._tickets.items()):
                if old.expires < now:
                    del self._tickets[ticket]
            if len(self._tickets) >= self.max_connections:
                raise ResourceExhaustedError(
                    f"{len(self._tickets)} data-plane transfers wait for their connection"
                )
            self._tickets[transfer.ticket] = transfer
        return transfer

    def revoke(self, transfer: Transfer) -> bool:
        """Withdraw ``transfer``'s ticket; whether no connection had claimed it."""
        with self._lock:
            return self._tickets.pop(transfer.ticket, None) is not None

    def _claim(self, ticket: bytes) -> Transfer | None:
        with self._lock:
            transfer = self._tickets.pop(ticket, None)
        if transfer is None or transfer.expires < time.monotonic():
            return None
        _settle(transfer.claimed)
        if transfer.reply.done():  # the call ended before its connection came
            return None
        return transfer

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(sock)
            if full:
                log.warning("data plane: %d connections open; refused one", self.max_connections)
                sock.close()
                continue
            threading.Thread(
                target=self._serve, args=(sock,), name="tensorwire-data-conn", daemon=True
            ).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            dataplane.configure(sock)
            sock.settimeout(HELLO_SECONDS)
            if self.tls is not None:
                sock = self._handshake(sock)
            while not self._closed and self._transfer(sock):
                sock.settimeout(IDLE_SECONDS)
        except (OSError, EOFError):
            pass  # the client went, or idled out: nothing of it is left
        finally:
            with self._lock:
                self._connections.discard(sock)
            sock.close()

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        """``sock`` over TLS, in place of the plain one the set of connections holds."""
        assert self.tls is not None
        tls = self.tls.wrap_socket(sock, server_side=True)
        with self._lock:
            self._connections.discard(sock)
            self._connections.add(tls)
        return tls

    def _transfer(self, sock: socket.socket) -> bool:
        """One transfer on ``sock``; whether the connection may carry another."""
        magic, ticket = REQUEST.unpack(dataplane.recv_exact(sock, REQUEST.size))
        transfer = self._claim(ticket) if magic == REQUEST_MAGIC else None
        if transfer is None:
            return False  # anything but a live ticket: dropped, nothing allocated
        sock.settimeout(transfer.stall_seconds)
        transfer.sock = sock
        try:
            sock.sendall(ACCEPTED)
            transfer.receiver.fill(sock.recv_into)
        except BaseException as exc:  # the handler reports it
            _settle(transfer.arrived, exc)
            return False
        finally:
            transfer.sock = None
        _settle(transfer.arrived)
        payloads = transfer.reply.result()  # the handler always answers (finally)
        if payloads is None:
            return False
        try:
            total = sum(p.nbytes for p in payloads)
            dataplane.send_all(sock, RESPONSE.pack(RESPONSE_MAGIC, total), payloads)
        except BaseException as exc:  # the handler reports it
            _settle(transfer.sent, exc)
            return False
        _settle(transfer.sent)
        self.transfers += 1  # one thread per connection: a lost update only miscounts
        self.bytes += transfer.receiver.total + total
        return True


def _settle(future: Future[None], error: BaseException | None = None) -> None:
    """Resolve ``future``, unless the handler that waited on it gave up (asyncio
    cancels a wrapped future when its waiter is cancelled)."""
    with contextlib.suppress(InvalidStateError):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
