"""The data port's wire format: payload bytes on a plain TCP connection beside gRPC.

gRPC stays the control plane: a streamed call (InferStream, GradStream, ...) sends its
header as ever, then a DataTransfer part instead of chunks, and the server answers
with a single-use ticket (proto/tensorwire/v1/tensorwire.proto, DataTransfer). The
client presents the ticket on a data connection and sends the payloads in stream
order, straight from its arrays; the server ``recv_into``\\ s them into the buffers it
allocated from the header. The response's payloads come back on the same
connection, after the response's header went over gRPC, into arrays the client
allocated from it. Statuses, deadlines and cancellation stay gRPC's.

Why not gRPC: grpcio copies every message four times in user space and cannot
receive into a caller's buffer (docs/performance.md); a socket's ``recv_into`` and
``sendall`` of a memoryview copy only between the kernel and the arrays.

On a connection, each transfer is:

    client -> server   REQUEST: b"TWD1", the 16-byte ticket
    server -> client   ACCEPTED: b"TWOK" (any other answer, or none: not this server's
                       ticket; the client sends chunks through gRPC instead)
    client -> server   the payload bytes
    server -> client   RESPONSE: b"TWR1", the response's payload byte count (uint64,
                       little-endian); then those bytes

A connection carries one transfer at a time and is reused for the next; anything
that goes wrong closes it.

Same host (Linux): a ticket may also name an abstract Unix socket (``local_socket``).
A client on the server's host connects to it (SOCK_SEQPACKET: each message whole, with
its file descriptors) and passes shared memory instead of bytes: a *segment* is a
memfd the client made, sealed against shrinking and growing (so a mapping of it can
never fault past its end), at least as large as its payload; one per non-empty
payload, in stream order. The server copies each input segment's payload (the
kernel's copy: ``preadv``) into memory of its own, since the client can still write
the segment, and writes the response's payloads into the client's output segments
(which must not be sealed against writes), which become the client's result arrays.
Neither side reads or writes past a payload's end. Per transfer:

    client -> server   SHARED: b"TWS1", the ticket; the input segments' descriptors
    server -> client   ACCEPTED: b"TWOK" once the inputs are copied (or the
                       connection closes: a segment was not acceptable)
    client -> server   OUTPUTS: b"TWO1" (after the response's header came over gRPC);
                       the output segments' descriptors (in several such messages
                       when there are more than MAX_SEGMENTS)
    server -> client   RESPONSE: b"TWR1", the payload byte count written; then one
                       byte per input segment: 1 when the server still holds a mapping
                       of it, so the client must never write to it again; 0 when the
                       client may reuse it. This server always sends 0 (it copies its
                       inputs); servers before issue 35 mapped them in place and sent
                       1 for an input a kept tensor used, so clients still honour it
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Final

#: Random bytes in a ticket: 128 bits, as unguessable as a session id.
TICKET_BYTES: Final = 16
#: What a client sends first for each transfer: magic and ticket.
REQUEST: Final = struct.Struct(f"<4s{TICKET_BYTES}s")
REQUEST_MAGIC: Final = b"TWD1"
#: What the server answers a live ticket with, before any payload byte is sent: a
#: connection that reached another server (a port mapped elsewhere, a balancer
#: between) learns it before it has sent anything, and falls back to gRPC.
ACCEPTED: Final = b"TWOK"
#: What the server sends first for each response: magic and payload byte count.
RESPONSE: Final = struct.Struct("<4sQ")
RESPONSE_MAGIC: Final = b"TWR1"

#: What a same-host client sends first for each transfer (REQUEST's layout), and
#: before the response's payloads are written.
SHARED_MAGIC: Final = b"TWS1"
OUTPUTS_MAGIC: Final = b"TWO1"
#: Descriptors one message may carry (Linux's SCM_MAX_FD): a request with more
#: non-empty payloads goes over the data port instead; a response's segments go in
#: as many messages as they need.
MAX_SEGMENTS: Final = 253

#: Reads into a buffer, returning the bytes read (0: the peer closed), as
#: ``socket.recv_into`` does.
ReadInto = Callable[[memoryview], int]


class DataPortError(ConnectionError):
    """A data connection broke or spoke out of turn."""


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from ``sock``; DataPortError if it closes first
    (EOFError when it closes before the first byte: a clean end between transfers)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            if not got:
                raise EOFError("the data connection closed")
            raise DataPortError(f"the data connection closed after {got} of {size} bytes")
        got += n
    return bytes(buf)


def send_all(sock: socket.socket, head: bytes, payloads: Sequence[memoryview]) -> None:
    """``head`` and then every payload, without copying the payloads."""
    sock.sendall(head)
    for payload in payloads:
        if payload.nbytes:
            sock.sendall(payload)


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` (bytes) into file ``fd`` at ``offset``: how a fresh same-host
    segment is filled, the kernel making its pages as it writes (faulting them in
    through a mapping costs twice as much)."""
    done = 0
    while done < data.nbytes:
        done += os.pwritev(fd, [data[done:]], offset + done)


def configure(sock: socket.socket) -> None:
    """Options for a data connection: no Nagle delay on the small preambles."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
