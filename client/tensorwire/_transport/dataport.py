"""The client's side of the data port (the format: tensorwire/wire/dataport.py):
where each streamed attempt's payloads go (DataRoutes), its connections, pooled per
server port, with TLS as its channel has it, same-host shared memory when the server
is on this host (same_host.py), and what it learnt of where either cannot be used.
The exchange that decides when to use them is ticket_exchange.py.

Blocking sockets, for both twins: ``recv_into`` and ``sendall`` release the GIL and
run at the kernel's speed; AsyncClient runs them on a thread.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from tensorwire._transport.channel import split_address
from tensorwire._transport.connections import (
    ANSWER_SECONDS,
    CONNECT_SECONDS,
    Detours,
    IdleConnections,
)
from tensorwire._transport.same_host import LocalCarrier, SameHost
from tensorwire._transport.targets import SCHEMES, Target, pinned, replicas
from tensorwire.errors import DeadlineExceededError, UnavailableError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import dataport, framing
from tensorwire.wire.dataport import (
    ACCEPTED,
    REQUEST,
    REQUEST_MAGIC,
    RESPONSE,
    RESPONSE_MAGIC,
)
from tensorwire.wire.streaming import Advance, StreamReceiver

#: Seconds a multi-replica target's addresses are used before resolving them again
#: for the data port (the channel's own resolver keeps its own pace).
REPLICAS_SECONDS: Final = 30.0


#: The request part, right after the header, that asks for the data port.
ASK_DATA: Final = framing.part(framing.PART_DATA, [], 0)
#: The most bytes one blocking send carries before the deadline is looked at again.
SEND_PIECE: Final = 8 << 20


class _Deadline:
    """A transfer's deadline across its many socket calls. A socket's timeout counts
    per call (and TLS's ``sendall`` sends piece by piece), so each call is given only
    what is left: a link cut mid-transfer fails it at the deadline, not a whole
    timeout after the last byte that got through."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def arm(self, sock: socket.socket) -> None:
        """Give ``sock``'s next blocking call what is left; TimeoutError when nothing is."""
        if self.at is None:
            return
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed")
        sock.settimeout(left)

    def reader(self, sock: socket.socket) -> Callable[[memoryview], int]:
        """``sock.recv_into``, each call within the deadline."""

        def recv_into(view: memoryview) -> int:
            self.arm(sock)
            return sock.recv_into(view)

        return recv_into


class DataLinks:
    """A client's data connections to one server, and whether to use them."""

    def __init__(
        self,
        host: str | None,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        same_host: SameHost | None = None,
    ):
        #: The host the data connections go to (the host of the client's target); None:
        #: no data port (a Unix socket target: only same-host transfers, if any).
        self.host = host
        self.tls = tls
        self.server_name = server_name or host
        #: Same-host transfers, when the client makes them.
        self.same_host = same_host
        #: Idle connections, by server port.
        self.idle: IdleConnections[int] = IdleConnections()
        #: When to ask for the data port again after it failed (one destination).
        self.detours: Detours[None] = Detours()

    def usable(self) -> bool:
        """Whether a streamed call should ask for the data port now."""
        reachable = self.host is not None or self.same_host is not None
        return reachable and not self.idle.closed and self.detours.open(None)

    def fall_back(self) -> None:
        """Send payloads through gRPC for FALLBACK_SECONDS (then the client asks
        again): the data port is unreachable, or the server has none."""
        self.detours.unreachable(None)

    def send(
        self,
        transfer: pb.DataTransfer,
        payloads: Sequence[memoryview],
        timeout: float | None,
        chunk_size: int,
        advance: Advance | None = None,
    ) -> socket.socket | None:
        """Present ``transfer``'s ticket and send ``payloads`` on a data connection,
        which then carries the response; None when no connection took the ticket (the
        caller sends chunks instead, and the client does for a while: see Detours).
        ``advance`` hears of every ``chunk_size`` bytes sent. OSError when the
        connection broke mid-way; whatever ``advance`` raises ends the transfer too."""
        deadline = _Deadline(timeout)  # the ticket's answer and TLS count too
        sock = self._accepted(transfer, timeout)
        if sock is None:
            return None
        try:
            total = sum(p.nbytes for p in payloads)
            done = 0
            if advance is not None:
                advance(0, total)
            step = SEND_PIECE if advance is None else chunk_size
            for payload in payloads:
                for start in range(0, payload.nbytes, step):
                    piece = payload[start : start + step]
                    deadline.arm(sock)
                    sock.sendall(piece)
                    done += piece.nbytes
                    if advance is not None:
                        advance(done, total)
        except BaseException:
            sock.close()
            raise
        return sock

    def _accepted(self, transfer: pb.DataTransfer, timeout: float | None) -> socket.socket | None:
        """A connection whose server accepted ``transfer``'s ticket, or None. A pooled
        connection the server has since closed is replaced by a fresh one."""
        preamble = REQUEST.pack(REQUEST_MAGIC, transfer.ticket)
        for pooled in (True, False):
            sock = self.idle.take(transfer.port) if pooled else None
            reused = sock is not None
            if sock is None:
                try:
                    sock = self._connect(transfer.port)
                except TimeoutError:
                    # Filtered, or its backlog is full (a flood): as a refusal, the
                    # detour grows with each one in a row.
                    break
                except OSError:
                    self.fall_back()  # nothing listens there, or no route to it
                    return None
            try:
                # Connected: a loaded server may take a moment to answer (it starts a
                # thread for each connection), a port that never does is no good.
                sock.settimeout(ANSWER_SECONDS if timeout is None else min(timeout, ANSWER_SECONDS))
                if not reused:
                    sock = self._secured(sock)
                sock.sendall(preamble)
                if dataport.recv_exact(sock, len(ACCEPTED)) == ACCEPTED:
                    sock.settimeout(timeout)
                    self.detours.accepted(None)
                    return sock
            except (OSError, EOFError):
                pass
            sock.close()
            if not reused:
                break  # a fresh connection refused it
        # The server was busy (it closed the connection to make room, or refused it),
        # or another server answered on that port: chunks for this call, and a while.
        self.detours.refused(None)
        return None

    def receive(
        self, sock: socket.socket, receiver: StreamReceiver[Any], timeout: float | None
    ) -> None:
        """Read a response's payloads from ``sock`` into ``receiver``'s arrays; the
        connection goes back to the pool after. UnavailableError when it broke,
        DeadlineExceededError when ``timeout`` ran out."""
        deadline = _Deadline(timeout)
        try:
            sock.settimeout(timeout)
            magic, size = RESPONSE.unpack(dataport.recv_exact(sock, RESPONSE.size))
            if magic != RESPONSE_MAGIC or size != receiver.total - receiver.received:
                raise dataport.DataPortError(
                    f"the data connection announced {size} bytes where the response "
                    f"declares {receiver.total - receiver.received}"
                )
            receiver.fill(deadline.reader(sock))
        except TimeoutError:  # the call's own deadline, which no retry can meet
            sock.close()
            raise DeadlineExceededError(
                "the deadline passed while the response arrived over the data port"
            ) from None
        except (OSError, EOFError) as exc:
            sock.close()
            raise UnavailableError(f"the data connection broke: {exc}") from None
        self.idle.give(sock.getpeername()[1], sock)

    def close(self) -> None:
        """Close every pooled connection; the data port is off from now on."""
        self.idle.close()

    def _connect(self, port: int) -> socket.socket:
        """A new connection to ``port``; OSError when nothing answers there."""
        assert self.host is not None  # usable() said so
        sock = socket.create_connection((self.host, port), timeout=CONNECT_SECONDS)
        try:
            dataport.configure(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _secured(self, sock: socket.socket) -> socket.socket:
        """``sock`` with TLS when the channel has it (a server that closes the
        connection at once fails the handshake: busy, not unreachable)."""
        if self.tls is None:
            return sock
        return self.tls.wrap_socket(sock, server_hostname=self.server_name)


class Carrier(Protocol):
    """The data connection of one transfer, once its request payloads are sent."""

    def receive(self, receiver: StreamReceiver[Any], timeout: float | None) -> None:
        """Get the response's payloads into ``receiver`` (its header taken)."""

    def discard(self) -> None:
        """The transfer failed: close the connection, keep nothing of it."""


@dataclass
class TcpCarrier:
    """A transfer on a data-port connection."""

    links: DataLinks
    sock: socket.socket

    def receive(self, receiver: StreamReceiver[Any], timeout: float | None) -> None:
        self.links.receive(self.sock, receiver, timeout)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def data_host(channel: str) -> str | None:
    """The one host a gRPC channel target reaches, for its data connections; None
    for a Unix socket, several addresses or a resolver of gRPC's own."""
    scheme, sep, rest = channel.partition(":")
    if sep and scheme in SCHEMES:
        if scheme == "dns":
            rest = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        elif scheme not in ("ipv4", "ipv6") or "," in rest:
            return None
        channel = rest
    host, _ = split_address(channel)
    return host or None


def tls_context(
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
) -> ssl.SSLContext:
    """The TLS a data connection uses: the channel's roots (the system's when None)
    and its client certificate, if any."""
    context = ssl.create_default_context(
        cadata=None if root_certificates is None else root_certificates.decode()
    )
    if certificate_chain is not None and private_key is not None:
        # ssl reads certificates from files only: a private file, gone once read.
        with tempfile.TemporaryDirectory() as folder:
            chain = os.path.join(folder, "chain.pem")
            key = os.path.join(folder, "key.pem")
            for path, data in ((chain, certificate_chain), (key, private_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            context.load_cert_chain(chain, key)
    return context


def discard(carrier: Carrier | None) -> None:
    """Close a connection whose transfer failed: what is left on it is unknown."""
    if carrier is not None:
        carrier.discard()


@dataclass(frozen=True)
class DataRoute:
    """Where a streamed attempt over the data port goes: the methods its call goes
    through, and the data connections to the same server."""

    methods: dict[str, Any]
    links: DataLinks


def answer_ticket(
    links: DataLinks,
    transfer: pb.DataTransfer,
    payloads: list[memoryview],
    receiver: StreamReceiver[Any],
    timeout: float | None,
    chunk_size: int,
    upload: Advance | None,
) -> tuple[Carrier | None, OSError | None]:
    """Answer the server's ticket (``transfer``): the payloads passed in shared
    memory when the server is on this host, else sent on a data connection; the
    carrier of the response (None: neither could be had: chunks instead), and the
    error that cut it."""
    try:
        local = links.same_host
        if local is not None and transfer.local_socket and local.usable(transfer.local_socket):
            carrier: LocalCarrier | None = local.send(
                *(transfer.local_socket, transfer.ticket, payloads, receiver),
                *(timeout, chunk_size, upload),
            )
            if carrier is not None:
                return carrier, None
        if links.host is None:
            return None, None  # no data port to try: chunks
        sock = links.send(transfer, payloads, timeout, chunk_size, upload)
        return (None if sock is None else TcpCarrier(links, sock)), None
    except OSError as exc:
        # The server's status says why (it closed the connection on failing).
        return None, exc


class DataRoutes:
    """Where one client's streamed attempts send their payloads over the data port:
    the data connections to its one server, or each replica's own."""

    def __init__(
        self,
        where: Target,
        on: bool,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        same_host: bool,
        open_channel: Callable[[Target], Any],
        bind: Callable[[Any], dict[str, Any]],
    ) -> None:
        self.on = on
        self.tls = tls
        self.server_name = server_name
        self.same_host = SameHost() if on and same_host else None
        self._open_channel = open_channel
        self._bind = bind
        host = data_host(where.channel) if on else None
        one = host is not None or where.channel.startswith(("unix:", "unix-abstract:"))
        #: The data connections when the target reaches one server, else None (then
        #: each replica has its own, in ``_replicas``).
        self.links = self._links(where) if on and one else None
        # Each replica's own channel, methods and data connections, opened when a
        # streamed call first goes to it; and the replicas' addresses, with when
        # they were resolved.
        self._replicas: dict[str, tuple[Any, dict[str, Any], DataLinks]] = {}
        self._resolved: tuple[float, list[str]] = (-REPLICAS_SECONDS, [])
        self._where = where
        self._lock = threading.Lock()

    def _links(self, where: Target) -> DataLinks:
        named = self.server_name or where.authority  # the name TLS checks, as gRPC's
        return DataLinks(
            data_host(where.channel),
            self.tls,
            None if named is None else split_address(named)[0],
            self.same_host,
        )

    def route(
        self, methods: dict[str, Any], balanced: bool, session: Target | None
    ) -> DataRoute | None:
        """Where a streamed attempt through ``methods`` goes when its payloads take the
        data port (None: they go through gRPC). A ticket is good on the server that
        issued it only, so with several replicas a ``balanced`` call (one any replica
        may answer) goes to one replica chosen at random for each call (as gRPC's
        round robin would), and a call of a session to the ``session``'s replica."""
        if self.links is not None:
            return DataRoute(methods, self.links) if self.links.usable() else None
        if not self.on:
            return None
        if balanced:
            found = self._replica_addresses()
            if not found:
                return None  # a resolver of gRPC's own
            address = random.choice(found)
        elif session is not None:
            address = session.channel  # the session lives there
        else:
            return None
        with self._lock:
            opened = self._replicas.get(address)
            if opened is None:
                where = pinned(self._where, address)
                channel = self._open_channel(where)
                opened = (channel, self._bind(channel), self._links(where))
                self._replicas[address] = opened
        _, bound, links = opened
        if not links.usable():
            return None
        return DataRoute(bound if balanced else methods, links)

    def _replica_addresses(self) -> list[str]:
        """The replicas' addresses, resolved again every REPLICAS_SECONDS."""
        when, found = self._resolved
        if time.monotonic() - when > REPLICAS_SECONDS:
            try:
                found = replicas(self._where)
            except UnavailableError:
                found = []
            self._resolved = (time.monotonic(), found)
        return found

    def close(self) -> list[Any]:
        """Close every data connection and free every segment; the replicas' channels,
        for the client to close."""
        channels = []
        for channel, _, links in self._replicas.values():
            channels.append(channel)
            links.close()
        if self.links is not None:
            self.links.close()
        if self.same_host is not None:
            self.same_host.close()
        return channels
