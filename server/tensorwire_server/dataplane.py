"""The server's data plane: a TCP listener beside gRPC that moves streamed payloads
with ``recv_into`` and ``sendall`` (the format: tensorwire/wire/dataplane.py).

A streamed call asks for a transfer; the handler allocates the request's buffers
from its header as ever (within the limits), then ``issue``\\ s a ticket for them.
A data connection that presents a live ticket claims it (once) and its bytes land
straight in those buffers; any other first bytes (a wrong magic, an unknown,
expired or used ticket) close the connection before anything is allocated. The
handler computes, sends the response's header over gRPC, and ``reply`` hands the
response's payloads to the connection, which sends them and takes the next ticket.

A client on this host may present its ticket on an abstract Unix socket instead,
with shared-memory segments in place of the bytes (segments.py): the kernel copies
each input segment into memory of the server's own, which the request's tensors then
are (the client can still write its segments: no kernel may read them), and writes
the response into the client's output segments.

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
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError
from tensorwire.wire import dataplane
from tensorwire.wire.dataplane import (
    ACCEPTED,
    MAX_SEGMENTS,
    OUTPUTS_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    RESPONSE,
    RESPONSE_MAGIC,
    SHARED_MAGIC,
)
from tensorwire.wire.streaming import StreamReceiver
from tensorwire_server import segments

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
    #: Whether the request's buffers are its tensors (on the CPU): the server's copies
    #: of same-host segments may then stand in for them; else (staged for a GPU) the
    #: segments are read into them.
    in_place: bool = True
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

    def revoke(self) -> bool:
        """Withdraw the ticket; whether no connection had claimed it."""
        return self.plane.revoke(self)

    def answer(self, payloads: list[memoryview] | None) -> None:
        """Hand the connection the response's payloads, or None: close it (the call
        failed; the client drops the connection too). Only the first answer counts."""
        if not self.reply.done():
            self.reply.set_result(payloads)

    def _take_reply(self) -> list[memoryview] | None:
        """Wait for the handler's answer, and keep no reference to it after: the
        payloads may be the request's own buffers, which go back to the warm pool
        (region_copies) once nothing holds them."""
        payloads = self.reply.result()
        self.reply = _ANSWERED
        return payloads


class DataPlane:
    """The listener, its connections and the tickets they may present."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 64,
        same_host: bool = False,
    ) -> None:
        #: The server's TLS, when gRPC has it: the data plane is never plainer.
        self.tls = tls
        self.max_connections = max_connections
        self._tickets: dict[bytes, Transfer] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        #: Transfers completed and the payload bytes they moved (both directions), per
        #: path: "tcp" (the data port) and "shared_memory" (same host).
        self.moved: dict[str, list[int]] = {"tcp": [0, 0], "shared_memory": [0, 0]}
        self._closed = False
        self._listener = socket.create_server(
            (host, port), family=_family(host), backlog=max_connections
        )
        self.port: int = self._listener.getsockname()[1]
        #: The abstract Unix socket same-host clients present tickets on; None: none.
        self.local_name: str | None = None
        self._local: socket.socket | None = None
        if same_host and segments.SUPPORTED:
            self._local, self.local_name = segments.listen(max_connections)
        self._threads = [
            threading.Thread(target=self._accept, args=(listener,), name=name, daemon=True)
            for listener, name in (
                (self._listener, "tensorwire-data"),
                (self._local, "tensorwire-data-local"),
            )
            if listener is not None
        ]

    def start(self) -> None:
        """Accept connections."""
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop listening and cut every connection (transfers in flight fail)."""
        self._closed = True
        with self._lock:
            connections = list(self._connections)
            self._tickets.clear()
        listeners = [s for s in (self._listener, self._local) if s is not None]
        for sock in [*listeners, *connections]:
            with contextlib.suppress(OSError):  # not connected, or already gone
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(5)

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per path, the transfers completed and the payload bytes they moved."""
        return {path: (n, size) for path, (n, size) in self.moved.items()}

    def issue(
        self, receiver: StreamReceiver[Any], stall_seconds: float, in_place: bool = True
    ) -> Transfer:
        """A ticket for ``receiver``'s payloads; RESOURCE_EXHAUSTED when as many
        transfers wait for their connection as connections are allowed. ``in_place``:
        the buffers are the request's tensors (see Transfer)."""
        now = time.monotonic()
        transfer = Transfer(
            secrets.token_bytes(dataplane.TICKET_BYTES),
            receiver,
            self,
            now + TICKET_SECONDS,
            stall_seconds,
            in_place,
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

    def _accept(self, listener: socket.socket) -> None:
        local = listener is self._local
        while not self._closed:
            try:
                sock, _ = listener.accept()
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
                target=self._serve, args=(sock, local), name="tensorwire-data-conn", daemon=True
            ).start()

    def _serve(self, sock: socket.socket, local: bool) -> None:
        try:
            sock.settimeout(HELLO_SECONDS)
            if not local:
                dataplane.configure(sock)
                if self.tls is not None:
                    sock = self._handshake(sock)
            transfer: Callable[[socket.socket], bool] = self._transfer
            if local:
                transfer = partial(self._transfer_local, mappings=segments.Mappings())
            while not self._closed and transfer(sock):
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
        # Counted before the handler hears of it: the call ends (and its client may read
        # the metrics) only after that.
        self._count("tcp", transfer.receiver.total + total)
        _settle(transfer.sent)
        return True

    def _transfer_local(self, sock: socket.socket, mappings: segments.Mappings) -> bool:
        """One same-host transfer on ``sock``; whether it may carry another. When the
        connection ends (an error, a refusal, the client gone or killed) its windows
        are unmapped here and now, not whenever the collector runs."""
        more = False
        try:
            more = self._shared(sock, mappings)
        finally:
            if more:
                mappings.settle()
            else:
                mappings.close()
        return more

    def _shared(self, sock: socket.socket, mappings: segments.Mappings) -> bool:
        message, fds, flags, _ = socket.recv_fds(sock, REQUEST.size, MAX_SEGMENTS)
        with segments.closing(fds):
            if not message:
                raise EOFError("the data connection closed")
            if flags & socket.MSG_CTRUNC or len(message) != REQUEST.size:
                return False
            magic, ticket = REQUEST.unpack(message)
            transfer = self._claim(ticket) if magic == SHARED_MAGIC else None
            if transfer is None:
                return False  # anything but a live ticket: dropped, nothing read
            sock.settimeout(transfer.stall_seconds)
            inputs = len(fds)
            try:
                _place(transfer, fds)
            except BaseException as exc:  # the handler reports it
                _settle(transfer.arrived, _untraced(exc))
                return False
        _settle(transfer.arrived)
        try:
            sock.sendall(ACCEPTED)
            payloads = transfer._take_reply()  # the handler always answers (finally)
            if payloads is None:
                return False
            fds = _outputs(sock, sum(1 for p in payloads if p.nbytes))
            with segments.closing(fds):
                written = segments.write_outputs(fds, payloads, mappings)
            del payloads
        except BaseException as exc:  # the handler reports it
            _settle(transfer.sent, _untraced(exc))
            return False
        self._count("shared_memory", transfer.receiver.total + written)
        _settle(transfer.sent)
        # The server holds none of the client's input segments (it copied them): the
        # client may reuse every one (a zero byte each; the format keeps the flags).
        sock.sendall(RESPONSE.pack(RESPONSE_MAGIC, written) + bytes(inputs))
        return True

    def _count(self, path: str, moved: int) -> None:
        # One thread per connection: a lost update only miscounts.
        counts = self.moved[path]
        counts[0] += 1
        counts[1] += moved


def _outputs(sock: socket.socket, wanted: int) -> list[int]:
    """The descriptors of the response's segments: ``wanted`` of them, in as many
    OUTPUTS messages as it takes (each carries MAX_SEGMENTS at most)."""
    fds: list[int] = []
    try:
        while True:
            message, more, flags, _ = socket.recv_fds(sock, len(OUTPUTS_MAGIC), MAX_SEGMENTS)
            fds += more
            if message != OUTPUTS_MAGIC or flags & socket.MSG_CTRUNC:
                raise InvalidArgumentError(
                    "shared memory: the client did not send the response's segments"
                )
            if len(fds) >= wanted:
                return fds
    except BaseException:
        with segments.closing(fds):
            raise


def _place(transfer: Transfer, fds: list[int]) -> None:
    """The request's payloads from the client's segments, each copied by the kernel:
    into buffers of the server's own that replace the allocated ones, or into those
    (staged for a GPU)."""
    receiver = transfer.receiver
    payloads = [v for _, v in receiver.payloads]
    if transfer.in_place:
        receiver.adopt(segments.read_inputs(fds, payloads))
    else:
        receiver.fill(segments.reader(fds, payloads))


#: The reply of a transfer whose connection has taken its payloads.
_ANSWERED: Future[list[memoryview] | None] = Future()
_ANSWERED.set_result(None)


def _settle(future: Future[None], error: BaseException | None = None) -> None:
    """Resolve ``future``, unless the handler that waited on it gave up (asyncio
    cancels a wrapped future when its waiter is cancelled)."""
    with contextlib.suppress(InvalidStateError):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _untraced(exc: BaseException) -> BaseException:
    """``exc`` without its tracebacks (and its context's): their frames hold the
    transfer whose future holds ``exc``, a cycle that would keep the request's and
    response's buffers until the collector runs (a client killed mid-call)."""
    seen: BaseException | None = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return exc


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
