"""The client's side of the data plane (the format: tensorwire/wire/dataplane.py):
its connections, pooled per server port, with TLS as its channel has it, and what
it learnt of where the data plane cannot be used.

Blocking sockets, for both twins: ``recv_into`` and ``sendall`` release the GIL and
run at the kernel's speed; AsyncClient runs them on a thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from tensorwire.channel import split_address
from tensorwire.errors import UnavailableError
from tensorwire.targets import SCHEMES
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import dataplane, framing
from tensorwire.wire.dataplane import (
    ACCEPTED,
    REQUEST,
    REQUEST_MAGIC,
    RESPONSE,
    RESPONSE_MAGIC,
)
from tensorwire.wire.streaming import Advance, StreamReceiver

#: Seconds to wait for a data connection and its server's acceptance of a ticket: a
#: port that does not answer by then is taken as unreachable (a firewall, a proxy, a
#: port not published).
CONNECT_SECONDS: Final = 1.0
#: Seconds the client sends payloads through gRPC after finding the data plane
#: unreachable, or the server without one, before it asks again.
FALLBACK_SECONDS: Final = 600.0
#: Idle connections kept per server port.
POOLED: Final = 8


#: The request part, right after the header, that asks for the data plane.
ASK_DATA: Final = framing.part(framing.PART_DATA, [], 0)


class DataLinks:
    """A client's data connections to one server host, and whether to use them."""

    def __init__(self, host: str | None, tls: ssl.SSLContext | None, server_name: str | None):
        #: The host the data connections go to (the host of the client's target); None:
        #: the target names no single host (a Unix socket, several replicas): off.
        self.host = host
        self.tls = tls
        self.server_name = server_name or host
        self._idle: dict[int, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._off_until = 0.0
        self._closed = False

    def usable(self) -> bool:
        """Whether a streamed call should ask for the data plane now."""
        return self.host is not None and not self._closed and time.monotonic() >= self._off_until

    def fall_back(self) -> None:
        """Send payloads through gRPC for a while: the data plane is not to be had."""
        self._off_until = time.monotonic() + FALLBACK_SECONDS

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
        caller sends chunks instead, and the client does for a while). ``advance``
        hears of every ``chunk_size`` bytes sent. OSError when the connection broke
        mid-way; whatever ``advance`` raises ends the transfer too."""
        sock = self._accepted(transfer, timeout)
        if sock is None:
            return None
        try:
            total = sum(p.nbytes for p in payloads)
            done = 0
            if advance is not None:
                advance(0, total)
            for payload in payloads:
                if advance is None:  # whole: each piece would cost a call into the kernel
                    sock.sendall(payload)
                    continue
                for start in range(0, payload.nbytes, chunk_size):
                    piece = payload[start : start + chunk_size]
                    sock.sendall(piece)
                    done += piece.nbytes
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
            try:
                sock, reused = self._take(transfer.port, pooled)
            except OSError:
                break  # nothing listens there, or it is filtered
            try:
                sock.settimeout(timeout if timeout is None else min(timeout, CONNECT_SECONDS))
                sock.sendall(preamble)
                if dataplane.recv_exact(sock, len(ACCEPTED)) == ACCEPTED:
                    sock.settimeout(timeout)
                    return sock
            except (OSError, EOFError):
                pass
            sock.close()
            if not reused:
                break  # a fresh connection refused it: another server took the call
        self.fall_back()
        return None

    def receive(
        self, sock: socket.socket, receiver: StreamReceiver[Any], timeout: float | None
    ) -> None:
        """Read a response's payloads from ``sock`` into ``receiver``'s arrays; the
        connection goes back to the pool after. UnavailableError when it broke."""
        try:
            sock.settimeout(timeout)
            magic, size = RESPONSE.unpack(dataplane.recv_exact(sock, RESPONSE.size))
            if magic != RESPONSE_MAGIC or size != receiver.total - receiver.received:
                raise dataplane.DataPlaneError(
                    f"the data connection announced {size} bytes where the response "
                    f"declares {receiver.total - receiver.received}"
                )
            receiver.fill(sock.recv_into)
        except (OSError, EOFError) as exc:
            sock.close()
            raise UnavailableError(f"the data connection broke: {exc}") from None
        self._give(sock)

    def close(self) -> None:
        """Close every pooled connection; the data plane is off from now on."""
        self._closed = True
        with self._lock:
            pooled = [sock for socks in self._idle.values() for sock in socks]
            self._idle.clear()
        for sock in pooled:
            sock.close()

    def _take(self, port: int, pooled: bool) -> tuple[socket.socket, bool]:
        """A connection to ``port``: an idle one when ``pooled`` and there is one,
        else a new one; and whether it was pooled."""
        with self._lock:
            idle = self._idle.get(port)
            if pooled and idle:
                return idle.pop(), True
        assert self.host is not None  # usable() said so
        sock = socket.create_connection((self.host, port), timeout=CONNECT_SECONDS)
        try:
            dataplane.configure(sock)
            if self.tls is not None:
                return self.tls.wrap_socket(sock, server_hostname=self.server_name), False
        except BaseException:
            sock.close()
            raise
        return sock, False

    def _give(self, sock: socket.socket) -> None:
        port = sock.getpeername()[1]
        with self._lock:
            idle = self._idle.setdefault(port, [])
            if not self._closed and len(idle) < POOLED:
                idle.append(sock)
                return
        sock.close()


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


def discard(sock: socket.socket | None) -> None:
    """Close a connection whose transfer failed: what is left on it is unknown."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


@dataclass(frozen=True)
class DataRoute:
    """Where a streamed attempt over the data plane goes: the methods its call goes
    through, and the data connections to the same server."""

    methods: dict[str, Any]
    links: DataLinks


def answer_ticket(
    links: DataLinks,
    body: memoryview,
    payloads: list[memoryview],
    timeout: float | None,
    chunk_size: int,
    upload: Advance | None,
) -> tuple[socket.socket | None, OSError | None]:
    """Answer the server's ticket (a DataTransfer, in ``body``): the payloads sent on
    a data connection, which carries the response (None: none could be made, or the
    server has no data plane: chunks instead), and the error that cut it."""
    transfer = pb.DataTransfer.FromString(bytes(body))
    if not transfer.ticket:
        links.fall_back()  # a server without a data plane
        return None, None
    try:
        return links.send(transfer, payloads, timeout, chunk_size, upload), None
    except OSError as exc:
        # The server's status says why (it closed the connection on failing).
        return None, exc
