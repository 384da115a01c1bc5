"""The server's data port: a TCP listener beside gRPC that moves streamed payloads
with ``recv_into`` and ``sendall`` (the format: tensorwire/wire/dataport.py).

A streamed call asks for a transfer; the handler allocates the request's buffers
from its header as ever (within the limits), then ``issue``\\ s a ticket for them.
A data connection that presents a live ticket claims it (once) and its bytes land
straight in those buffers; any other first bytes (a wrong magic, an unknown,
expired or used ticket) close the connection before anything is allocated. The
handler computes, sends the response's header over gRPC, and ``reply`` hands the
response's payloads to the connection, which sends them and takes the next ticket.

A client on this host may present its ticket on an abstract Unix socket instead,
with shared-memory segments in place of the bytes (same_host.py): the kernel copies
each input segment into memory of the server's own, which the request's tensors then
are (the client can still write its segments: no kernel may read them), and writes
the response into the client's output segments.

Each connection has a thread of its own: a blocking ``recv_into`` runs at the
kernel's speed with the GIL released, where the event loop would wake up for every
few hundred KiB. Connections are few (clients pool them) and bounded: each listener
has a budget of its own, in which anonymous and idle connections make room for new
ones, and transfers are bounded per caller and in all (budgets.py).
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

from tensorwire.wire import dataport, lane
from tensorwire.wire.dataport import (
    ACCEPTED,
    MAX_SEGMENTS,
    REQUEST,
    REQUEST_MAGIC,
    RESPONSE,
    RESPONSE_MAGIC,
    SHARED_MAGIC,
)
from tensorwire.wire.streaming import StreamReceiver
from tensorwire_server import timeline
from tensorwire_server.dataport import same_host as segments
from tensorwire_server.dataport.budgets import Budget, Connection, Slots
from tensorwire_server.regions.copies import Copies
from tensorwire_server.timeline import TRANSFER, Timeline

log = logging.getLogger(__name__)

#: Seconds a ticket may wait for its connection: a client connects at once.
TICKET_SECONDS: Final = 10.0
#: Seconds a pooled connection may sit idle between transfers.
IDLE_SECONDS: Final = 300.0
#: Seconds a new connection has to present its first ticket: a client sends it as
#: soon as it connects (after the TLS handshake).
HELLO_SECONDS: Final = 3.0
#: Seconds between two warnings that a listener refused connections.
WARN_SECONDS: Final = 60.0


@dataclass(eq=False)
class Transfer:
    """One streamed request's trip over the data port."""

    ticket: bytes
    receiver: StreamReceiver[Any]
    #: The plane that issued it, and the port its connection comes to.
    plane: DataPort
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
    #: The caller whose transfer slot it holds; None once given back (``revoke``).
    holder: str | None = None
    #: The call's timeline (the ticket is issued in the call): its transfers go in it.
    timeline: Timeline | None = field(default_factory=timeline.current)

    def record(self, path: str, direction: str, start: int, moved: int) -> None:
        """Record a transfer from ``start`` (perf_counter_ns) until now in the call's
        timeline."""
        if self.timeline is not None:
            attributes = {
                "tensorwire.path": path,
                "tensorwire.direction": direction,
                "tensorwire.bytes": moved,
            }
            self.timeline.add(TRANSFER, start, time.perf_counter_ns(), attributes)

    def abandon(self) -> None:
        """The call ended without an answer (failed, cancelled, past its deadline):
        close the connection, so that a transfer still arriving stops at once and
        lets go of the request's buffers."""
        self.answer(None)
        # Unsent payloads go now, not when the last reference to the transfer does
        # (an error's traceback may hold it until a garbage collection).
        self.reply = _ANSWERED
        sock = self.sock  # set only while the payload arrives
        if sock is not None:
            _cut(sock)

    def revoke(self) -> bool:
        """Withdraw the ticket, and give back the caller's transfer slot (a transfer
        that ends, whichever way, is revoked); whether no connection had claimed it."""
        return self.plane.revoke(self)

    def answer(self, payloads: list[memoryview] | None) -> None:
        """Hand the connection the response's payloads, or None: close it (the call
        failed; the client drops the connection too). Only the first answer counts."""
        if not self.reply.done():
            self.reply.set_result(payloads)

    def _take_reply(self) -> list[memoryview] | None:
        """Wait for the handler's answer, and keep no reference to it after: the
        payloads may be the request's own buffers, which go back to the server's warm
        pool (regions.copies) once nothing holds them."""
        payloads = self.reply.result()
        self.reply = _ANSWERED
        return payloads


class DataPort:
    """The listener, its connections and the tickets they may present."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        connections: int = 128,
        transfers: int = 64,
        transfers_per_caller: int = 16,
        same_host: bool = False,
        *,
        copies: Copies,
    ) -> None:
        """``connections``: each listener's budget; ``transfers``: in flight at once,
        ``transfers_per_caller`` of them for one caller (fewer than ``connections``:
        a ticket holder always finds room). ``copies``: the server's, which same-host
        transfers copy through."""
        #: The server's TLS, when gRPC has it: the data port is never plainer.
        self.tls = tls
        #: The server's kernel copies, for same-host transfers.
        self.copies = copies
        self._tickets: dict[bytes, Transfer] = {}
        self._lock = threading.Lock()
        #: Each listener's connections: the data port's, the same-host socket's.
        self.budgets = {"tcp": Budget(connections), "shared_memory": Budget(connections)}
        self.slots = Slots(min(transfers, connections - 1), transfers_per_caller)
        # The connection this thread serves (each has a thread of its own).
        self._serving = threading.local()
        self._warned = -WARN_SECONDS
        #: Transfers completed and the payload bytes they moved (both directions), per
        #: path: "tcp" (the data port) and "shared_memory" (same host).
        self.moved: dict[str, list[int]] = {"tcp": [0, 0], "shared_memory": [0, 0]}
        self._closed = False
        self._listener = socket.create_server(
            (host, port), family=_family(host), backlog=connections
        )
        self.port: int = self._listener.getsockname()[1]
        #: Where a connection that opens with the fast lane's bytes goes (None: no
        #: lane; it is closed as any other unknown opening).
        self.lane: Callable[[socket.socket], None] | None = None
        #: The abstract Unix socket same-host clients present tickets on; None: none.
        self.local_name: str | None = None
        self._local: socket.socket | None = None
        if same_host and segments.SUPPORTED:
            self._local, self.local_name = segments.listen(connections)
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
            self._tickets.clear()
        for listener in (self._listener, self._local):
            if listener is not None:
                _cut(listener)
                listener.close()
        for budget in self.budgets.values():
            for connection in budget.connections():
                _cut(connection.sock)  # its thread closes it
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(5)

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per path, the transfers completed and the payload bytes they moved."""
        return {path: (n, size) for path, (n, size) in self.moved.items()}

    def issue(
        self,
        receiver: StreamReceiver[Any],
        stall_seconds: float,
        in_place: bool = True,
        caller: str = "",
    ) -> Transfer | None:
        """A ticket for ``receiver``'s payloads, holding one of ``caller``'s transfer
        slots until revoked; None when it or the server has none left (the call's
        payloads go through gRPC). ``in_place``: the buffers are the request's
        tensors (see Transfer)."""
        if not self.slots.take(caller):
            return None
        now = time.monotonic()
        transfer = Transfer(
            secrets.token_bytes(dataport.TICKET_BYTES),
            receiver,
            self,
            now + TICKET_SECONDS,
            stall_seconds,
            in_place,
        )
        transfer.holder = caller
        with self._lock:
            # Lapsed tickets (their calls still hold their slots until they end).
            for ticket, old in list(self._tickets.items()):
                if old.expires < now:
                    del self._tickets[ticket]
            self._tickets[transfer.ticket] = transfer
        return transfer

    def revoke(self, transfer: Transfer) -> bool:
        """Withdraw ``transfer``'s ticket and give back its slot (once); whether no
        connection had claimed it."""
        with self._lock:
            unclaimed = self._tickets.pop(transfer.ticket, None) is not None
            holder, transfer.holder = transfer.holder, None
        if holder is not None:
            self.slots.give(holder)
        return unclaimed

    def _claim(self, ticket: bytes) -> Transfer | None:
        """The transfer ``ticket`` is good for, claimed by this thread's connection
        (busy from now on, never evicted); None: no live ticket, or the connection
        was evicted (the ticket stays good: its client sends it again or chunks)."""
        budget, connection = self._serving.budget, self._serving.connection
        if not budget.claim(connection):
            return None
        with self._lock:
            transfer = self._tickets.pop(ticket, None)
        if transfer is None or transfer.expires < time.monotonic():
            budget.rest(connection, served=False)
            return None
        _settle(transfer.claimed)
        if transfer.reply.done():  # the call ended before its connection came
            return None
        return transfer

    def _accept(self, listener: socket.socket) -> None:
        local = listener is self._local
        budget = self.budgets["shared_memory" if local else "tcp"]
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            connection, evicted = budget.admit(sock)
            if evicted is not None:
                _cut(evicted.sock)  # its thread closes it
            if connection is None:
                sock.close()
                self._refused(budget, local)
                continue
            threading.Thread(
                target=self._serve,
                args=(budget, connection, local),
                name="tensorwire-data-conn",
                daemon=True,
            ).start()

    def _refused(self, budget: Budget, local: bool) -> None:
        """Warn (now and then: a flood must not flood the log) of a refusal."""
        now = time.monotonic()
        if now - self._warned >= WARN_SECONDS:
            self._warned = now
            where = "same-host socket" if local else "data port"
            log.warning(
                "data port: the %s refused a connection: all %d carry transfers",
                where,
                budget.limit,
            )

    def _serve(self, budget: Budget, connection: Connection, local: bool) -> None:
        sock = connection.sock
        self._serving.budget, self._serving.connection = budget, connection
        try:
            sock.settimeout(HELLO_SECONDS)
            if not local:
                dataport.configure(sock)
                if self.lane is not None and _opens_lane(sock):
                    # A fast-lane connection: the lane serves it (on the event loop).
                    self.lane(socket.socket(fileno=sock.detach()))
                    return
                if self.tls is not None:
                    sock = connection.sock = self.tls.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                    # Evicted before the swap: the plain socket it cut was detached.
                    if connection.gone:
                        return
                    sock.do_handshake()
            transfer: Callable[[socket.socket], bool] = self._transfer
            if local:
                transfer = partial(self._transfer_local, mappings=segments.Mappings())
            while not self._closed and transfer(sock):
                budget.rest(connection)
                sock.settimeout(IDLE_SECONDS)
        except (OSError, EOFError, ValueError):
            pass  # the client went, idled out or was evicted: nothing of it is left
        finally:
            budget.leave(connection)
            sock.close()

    def _transfer(self, sock: socket.socket) -> bool:
        """One transfer on ``sock``; whether the connection may carry another."""
        magic, ticket = REQUEST.unpack(dataport.recv_exact(sock, REQUEST.size))
        transfer = self._claim(ticket) if magic == REQUEST_MAGIC else None
        if transfer is None:
            return False  # anything but a live ticket: dropped, nothing allocated
        sock.settimeout(transfer.stall_seconds)
        transfer.sock = sock
        began = time.perf_counter_ns()
        try:
            sock.sendall(ACCEPTED)
            transfer.receiver.fill(sock.recv_into)
        except BaseException as exc:  # the handler reports it
            _settle(transfer.arrived, exc)
            return False
        finally:
            transfer.sock = None
        transfer.record("tcp", "in", began, transfer.receiver.total)
        _settle(transfer.arrived)
        payloads = transfer._take_reply()  # the handler always answers (finally)
        if payloads is None:
            return False
        began = time.perf_counter_ns()
        try:
            total = sum(p.nbytes for p in payloads)
            dataport.send_all(sock, RESPONSE.pack(RESPONSE_MAGIC, total), payloads)
        except BaseException as exc:  # the handler reports it
            _settle(transfer.sent, exc)
            return False
        finally:
            del payloads  # the response's buffers go as soon as the connection does
        # Counted before the handler hears of it: the call ends (and its client may read
        # the metrics) only after that.
        self._count("tcp", transfer.receiver.total + total)
        transfer.record("tcp", "out", began, total)
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
            began = time.perf_counter_ns()
            try:
                _place(transfer, fds, self.copies)
            except BaseException as exc:  # the handler reports it
                _settle(transfer.arrived, _untraced(exc))
                return False
        transfer.record("shared_memory", "in", began, transfer.receiver.total)
        _settle(transfer.arrived)
        try:
            sock.sendall(ACCEPTED)
            payloads = transfer._take_reply()  # the handler always answers (finally)
            if payloads is None:
                return False
            fds = segments.receive_outputs(sock, sum(1 for p in payloads if p.nbytes))
            began = time.perf_counter_ns()
            with segments.closing(fds):
                written = segments.write_outputs(fds, payloads, mappings, self.copies)
            del payloads
        except BaseException as exc:  # the handler reports it
            _settle(transfer.sent, _untraced(exc))
            return False
        self._count("shared_memory", transfer.receiver.total + written)
        transfer.record("shared_memory", "out", began, written)
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


def _place(transfer: Transfer, fds: list[int], copies: Copies) -> None:
    """The request's payloads from the client's segments (same_host.place)."""
    segments.place(transfer.receiver, transfer.in_place, fds, copies)


def _opens_lane(sock: socket.socket) -> bool:
    """Whether ``sock``'s first bytes are the fast lane's opening (then consumed)."""
    if sock.recv(len(lane.OPENING), socket.MSG_PEEK | socket.MSG_WAITALL) != lane.OPENING:
        return False
    return dataport.recv_exact(sock, len(lane.OPENING)) == lane.OPENING


#: The reply of a transfer whose connection has taken its payloads.
_ANSWERED: Future[list[memoryview] | None] = Future()
_ANSWERED.set_result(None)


def _settle(future: Future[None], error: BaseException | None = None) -> None:
    """Resolve ``future``, unless the handler that waited on it gave up (asyncio
    cancels a wrapped future when its waiter is cancelled). ``error`` is kept without
    its traceback: that holds the connection thread's frames, whose locals are the
    transfer and its payloads, a cycle only the garbage collector would free."""
    with contextlib.suppress(InvalidStateError):
        if error is None:
            future.set_result(None)
        else:
            error.__traceback__ = error.__context__ = error.__cause__ = None
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


def _cut(sock: socket.socket) -> None:
    """Shut ``sock`` down from another thread, so that its blocked reader or writer
    returns at once. A TLS socket's own ``shutdown`` would drop its TLS state under
    that thread's feet: the plain socket's is used."""
    with contextlib.suppress(OSError):  # not connected, or already gone
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
