"""A DNS name for the replicas: one UDP responder answering A queries for one name
with the address of every node that serves it, so that a client given that name (and
a resolver pointed here, or a zone delegated here, as with Consul) finds replicas as
they come and go: gRPC resolves it again whenever a connection ends, and the client's
data routes every few seconds (docs/deploy.md, "Ray").

It answers A queries for its name only, and refuses nothing else loudly: any other
question gets NXDOMAIN (or an empty answer for another type of record of its name),
and a malformed datagram is dropped. Replies fit in 512 bytes (plain UDP DNS): with
more addresses than fit, each reply carries as many as do, starting one further along
the list each time, so that every replica gets its share of the clients. No TC bit:
it serves no TCP to retry over, and a partial list is a whole answer here.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

#: Seconds resolvers may keep an answer: short, so replicas lost leave the name soon.
TTL = 1
_A, _IN = 1, 1
_NXDOMAIN, _NOTIMP = 3, 4
#: The largest reply: what a UDP DNS message may hold without EDNS.
MAX_REPLY = 512
_RECORD = 16  # a pointer to the name, type, class, TTL, length, 4 address bytes


def _labels(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"{name!r} is no DNS name")
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def _question(packet: bytes) -> tuple[bytes, int, int, int]:
    """The first question's name (as on the wire, lower case), type, class, and
    where it ends; ValueError when the datagram holds none."""
    at = 12
    while True:
        if at >= len(packet):
            raise ValueError("truncated name")
        size = packet[at]
        if size & 0xC0:
            raise ValueError("compressed name in a question")
        at += 1 + size
        if size == 0:
            break
        if at - 12 > 255:
            raise ValueError("name longer than 255 bytes")
    if at + 4 > len(packet):
        raise ValueError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", packet, at)
    return packet[12:at].lower(), qtype, qclass, at + 4


def record(ip: str) -> bytes:
    """The A record of IPv4 address ``ip`` for the question's name; OSError: not one."""
    # 0xC00C points at the question's name, at offset 12.
    return struct.pack("!HHHIH", 0xC00C, _A, _IN, TTL, 4) + socket.inet_pton(socket.AF_INET, ip)


def answer(packet: bytes, name: bytes, records: Sequence[bytes], start: int = 0) -> bytes | None:
    """The response to the query ``packet`` for the name ``name`` (wire form) whose
    A records (``record``) are ``records``: as many as fit in MAX_REPLY, from
    ``start`` on round the list; None: not a query this answers at all."""
    if len(packet) < 12:
        return None
    ident, flags, questions = struct.unpack_from("!HHH", packet)
    if flags & 0x8000 or questions != 1:  # a response, or not one question
        return None
    try:
        qname, qtype, qclass, end = _question(packet)
    except ValueError:
        return None
    opcode = (flags >> 11) & 0xF
    rcode = 0
    chosen: list[bytes] = []
    if opcode != 0:
        rcode = _NOTIMP
    elif qname != name:
        rcode = _NXDOMAIN
    elif qtype == _A and qclass == _IN and records:
        room = (MAX_REPLY - end) // _RECORD
        first = start % len(records)
        chosen = [*records[first:], *records[:first]][:room]
    # QR, the query's opcode and RD, AA (ours is the authority), RA off.
    head = struct.pack(
        "!HHHHHH", ident, 0x8000 | (flags & 0x7900) | 0x0400 | rcode, 1, len(chosen), 0, 0
    )
    return head + packet[12:end] + b"".join(chosen)


class Responder:
    """Answers ``name`` on UDP ``host:port`` with the addresses ``set_addresses``
    last gave, from a thread of its own, until ``close``."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name.rstrip(".")
        self._wire = _labels(self.name).lower()
        self._records: tuple[bytes, ...] = ()
        self._turn = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._sock.settimeout(0.5)  # to see ``close`` soon: closing wakes no recvfrom
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="tensorwire-dns", daemon=True)
        self._thread.start()

    def set_addresses(self, ips: Iterable[str]) -> None:
        """Answer with these addresses from now on (each once, in this order); any
        that is no IPv4 address is logged and left out."""
        records = []
        for ip in dict.fromkeys(ips):
            try:
                records.append(record(ip))
            except OSError:
                log.error("DNS %s: %r is no IPv4 address, left out of the answers", self.name, ip)
        self._records = tuple(records)

    def _serve(self) -> None:
        while not self._closed:
            try:
                packet, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                reply = answer(packet, self._wire, self._records, self._turn)
                if reply is None:
                    continue
                self._turn += 1
                self._sock.sendto(reply, peer)
            except OSError as exc:
                log.debug("no answer to %s: %s", peer, exc)
            except Exception:  # a bug here must not end the name: log it, answer on
                log.exception("DNS %s: answering %s", self.name, peer)

    def close(self) -> None:
        """Stop answering."""
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()
