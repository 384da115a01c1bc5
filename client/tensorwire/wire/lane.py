"""The fast lane's wire format: small calls as compact frames on a data-port connection.

A client asks for a grant over gRPC (``OpenLane``: authenticated and authorised like any
call, bound to its token, good once, for seconds), then opens a TCP connection to the
data port (TLS when gRPC has it) and sends, in this order:

    OPENING   b"TWL1", in plain text before any TLS: the data port's thread hands the
              connection to the lane (the event loop) instead of waiting for a ticket
    (the TLS handshake, when the server has TLS)
    HELLO     b"TWLG", the 16-byte grant
    server -> ACCEPTED b"TWOK" (or the connection closes: not a live grant)

On the server's host (Linux), a grant may also name an abstract Unix stream socket
(``OpenLaneResponse.local_socket``): a client that can connect to it sends the same
OPENING and HELLO there, with no TLS (the kernel carries the bytes; the grant came over
the channel's own TLS); the server answers ACCEPTED and the grant's 16-byte
``local_proof``, which the client checks before it sends a call. It skips the loopback
TCP stack: about half a small call's round trip in the kernel. One it cannot reach
(another host or network namespace) goes to the data port.

Then the connection carries calls, each a REQUEST frame and its RESPONSE frame:

    REQUEST   b"TWQ1", call id (uint64), timeout in seconds (float64; negative: none),
              then the lengths of the method path (uint16), the metadata (uint16) and
              the body (uint32), then those bytes: the gRPC method path (ASCII), the
              metadata as pairs (``pairs``), and the request message exactly as gRPC
              would carry it (tensorwire's codec; nothing is ever pickled)
    RESPONSE  b"TWA1", the call id, the gRPC status code (uint16), the lengths of the
              status message (uint16), the trailing metadata (uint16) and the body
              (uint32), then those bytes; the body is empty unless the code is OK

While a call runs longer than its keepalive interval, the client may send a PING
(REQUEST's layout, magic b"TWP1", every other field 0); the server answers each with a
PONG at once (RESPONSE's layout, magic b"TWP2", every other field 0), before or after
the call's RESPONSE. A server that is alive but not answering (stopped, wedged) is so
noticed, as gRPC's keepalive pings notice it.

All integers are little-endian. A server may carry several calls of one connection at
once and answers each with its id; this client sends one at a time per connection
(docs/performance.md says why). Closing the connection cancels its calls. A frame past
the limits, or anything out of turn, closes the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

#: Plain-text bytes that open a lane connection (before TLS).
OPENING: Final = b"TWL1"
#: What the client sends once secured: magic and grant.
HELLO: Final = struct.Struct("<4s16s")
HELLO_MAGIC: Final = b"TWLG"
#: The largest request body a server takes on the lane (a grant may say less: its
#: ``max_request_bytes``); larger calls go by gRPC.
MAX_REQUEST: Final = 8 << 20
#: The send buffer both ends of a Unix-socket connection ask for (the kernel caps it at
#: net.core.wmem_max): a request or answer of a few MiB goes in one send.
LOCAL_SEND_BUFFER: Final = 4 << 20
#: Random bytes in a grant.
GRANT_BYTES: Final = 16
#: The server's answer to a live grant (the data port's own ACCEPTED).
ACCEPTED: Final = b"TWOK"

REQUEST: Final = struct.Struct("<4sQdHHI")
REQUEST_MAGIC: Final = b"TWQ1"
RESPONSE: Final = struct.Struct("<4sQHHHI")
RESPONSE_MAGIC: Final = b"TWA1"

#: Keepalive: a ping and its answer.
PING_MAGIC: Final = b"TWP1"
PONG_MAGIC: Final = b"TWP2"
PING: Final = REQUEST.pack(PING_MAGIC, 0, 0.0, 0, 0, 0)
PONG: Final = RESPONSE.pack(PONG_MAGIC, 0, 0, 0, 0, 0)

#: The longest method path and metadata a request frame may carry.
MAX_METHOD: Final = 128
MAX_METADATA: Final = 8192
#: The longest status message a response carries (clipped by the server).
MAX_DETAILS: Final = 8192


class LaneError(ConnectionError):
    """A lane connection broke or spoke out of turn."""


def pairs(metadata: Iterable[tuple[str, str]]) -> bytes:
    """Metadata as bytes: each pair as the key's length (uint8), the value's (uint16),
    then the key and the value (UTF-8)."""
    out = bytearray()
    for key, value in metadata:
        k, v = key.encode(), value.encode()
        out += struct.pack("<BH", len(k), len(v)) + k + v
    return bytes(out)


def unpairs(data: bytes | memoryview) -> list[tuple[str, str]]:
    """The pairs ``pairs`` made; LaneError for anything else."""
    out: list[tuple[str, str]] = []
    view = memoryview(data)
    at = 0
    try:
        while at < len(view):
            k, v = struct.unpack_from("<BH", view, at)
            at += 3
            if at + k + v > len(view):
                raise LaneError("metadata runs past its frame")
            key = bytes(view[at : at + k]).decode()
            value = bytes(view[at + k : at + k + v]).decode()
            at += k + v
            out.append((key, value))
    except (struct.error, UnicodeDecodeError) as exc:
        raise LaneError(f"malformed metadata: {exc}") from None
    return out


def request_frame(
    call_id: int,
    method: str,
    timeout: float | None,
    metadata: bytes,
    body: bytes,
) -> list[bytes]:
    """A REQUEST frame as pieces to send (the body is not copied)."""
    path = method.encode()
    head = REQUEST.pack(
        REQUEST_MAGIC,
        call_id,
        -1.0 if timeout is None else timeout,
        len(path),
        len(metadata),
        len(body),
    )
    return [head + path + metadata, body]


def response_frame(
    call_id: int, code: int, details: str, metadata: bytes, body: bytes
) -> list[bytes]:
    """A RESPONSE frame as pieces to send."""
    text = details.encode()[:MAX_DETAILS]
    head = RESPONSE.pack(RESPONSE_MAGIC, call_id, code, len(text), len(metadata), len(body))
    return [head + text + metadata, body]
