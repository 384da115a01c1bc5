"""The exchange of one streamed attempt, written once for both twins: a state machine
that does no I/O. It gives the request parts to send, is told each response part
that arrives, and says what blocking work comes next, which each twin runs its own
way (BlockingTransport in place, AsyncTransport on a thread) and reports with
``done``.

With a data route (dataport.py), the request is its header and a part that asks for
a ticket (ASK_DATA). The server answers with a ticket, or with none: "send chunks"
(its data port is busy; or it has none, and then the client keeps its payloads in
gRPC for a while: ``DataLinks.fall_back``). The ticket is presented on the server's
same-host socket or its data port (``Present``); where neither takes it, the payloads
follow as chunks through gRPC after all. The response's header comes through gRPC,
its payloads on the connection that carried the request's (``Collect``). Without a
data route, every part of both goes through gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tensorwire._transport.calls import CallState
from tensorwire._transport.dataport import (
    ASK_DATA,
    Carrier,
    DataLinks,
    DataRoute,
    answer_ticket,
    discard,
)
from tensorwire._transport.methods import RESPONSES
from tensorwire.errors import UnavailableError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.codec import Received
from tensorwire.wire.streaming import Advance, StreamReceiver


@dataclass(frozen=True)
class Present:
    """Work: present the server's ticket and pass the payloads in shared memory or
    send them on a data connection (``dataport.answer_ticket``). Its result, for
    ``done``: the carrier of the response (None: chunks instead) and the error that
    cut it."""

    links: DataLinks
    transfer: pb.DataTransfer
    payloads: list[memoryview]
    receiver: StreamReceiver[Any]
    chunk_size: int
    upload: Advance | None

    def __call__(self, timeout: float | None) -> tuple[Carrier | None, OSError | None]:
        return answer_ticket(
            *(self.links, self.transfer, self.payloads, self.receiver),
            *(timeout, self.chunk_size, self.upload),
        )

    @staticmethod
    def abandoned(result: tuple[Carrier | None, OSError | None]) -> None:
        """The result came after its attempt ended: close the connection it holds."""
        discard(result[0])


@dataclass(frozen=True)
class Collect:
    """Work: get the response's payloads from the carrier of the request's into the
    receiver; the connection goes back to its pool. Its result, for ``done``: None."""

    carrier: Carrier
    receiver: StreamReceiver[Any]

    def __call__(self, timeout: float | None) -> None:
        self.carrier.receive(self.receiver, timeout)

    @staticmethod
    def abandoned(result: None) -> None:
        """Nothing to close: the transfer ended and its connection is pooled."""


#: The blocking work of an exchange: called with the seconds left of the call's
#: deadline, it returns what ``done`` is told.
Work = Present | Collect


class TicketExchange:
    """One streamed attempt of ``call``: its payloads over ``route`` (None: through
    gRPC), chunks of ``chunk_size`` bytes. ``chunks_follow`` is told once, for the
    request side, whether the payloads follow as chunks after the ticket's answer
    (False too when the attempt is abandoned)."""

    def __init__(
        self,
        call: CallState,
        route: DataRoute | None,
        chunk_size: int,
        chunks_follow: Callable[[bool], None],
    ) -> None:
        self.call = call
        #: The response, as its parts arrive (its progress reported from 0).
        self.receiver: StreamReceiver[Any] = StreamReceiver(
            RESPONSES[call.method], advance=call.reporter.stage("download")
        )
        #: The method callables of the attempt: the route's replica issues the ticket.
        self.methods = call.methods if route is None else route.methods
        #: The ``<method>Stream`` method to call.
        self.method = f"{call.method}Stream"
        #: Whether the request side waits, after ``opening``, to hear whether chunks follow.
        self.asks = route is not None
        self._links = None if route is None else route.links
        self._chunks_follow = chunks_follow
        self._chunk_size = chunk_size
        self._upload = call.reporter.stage("upload")
        self._payloads: list[memoryview] = []
        self._chunks: Iterator[bytes] = iter(())
        #: The parts sent first: the whole request, or its header and the ask for a ticket.
        self.opening: Iterable[bytes]
        if route is None:
            self.opening = streaming.parts(call.encoder, chunk_size, self._upload)
        else:
            header, self._payloads = call.encoder.header()
            self.opening = (streaming.header_part(header), ASK_DATA)
            self._chunks = streaming.chunk_parts(self._payloads, chunk_size, self._upload)
        self._work: Work | None = None
        # The connection that carried the request's payloads and carries the response's
        # (None: none, or its transfer ended), and the error that cut one.
        self._carrier: Carrier | None = None
        self._broke: OSError | None = None

    @property
    def chunks(self) -> Iterator[bytes]:
        """The parts that carry the payloads through gRPC, when ``chunks_follow`` said so."""
        return self._chunks

    def received(self, raw: bytes) -> Work | None:
        """Take a response part; the work it calls for, if any, to run and report
        with ``done`` before the next part."""
        number, body = framing.split_part(raw)
        if self._links is None or number != framing.PART_DATA:
            self.call.responded = True
            self.receiver.take(number, body)
            return None
        if self.receiver.started:  # the response's payloads follow on the connection
            if self._carrier is None:
                raise UnavailableError("the data connection broke") from self._broke
            self._work = Collect(self._carrier, self.receiver)
            return self._work
        # The answer to the ask: a ticket, or none (chunks).
        transfer = pb.DataTransfer.FromString(bytes(body))
        if not transfer.ticket:
            if not transfer.port:
                self._links.fall_back()  # a server without a data port
            # else its data port is busy: chunks for this call
            self._answered(None, None)
            return None
        self._work = Present(
            *(self._links, transfer, self._payloads, self.receiver),
            *(self._chunk_size, self._upload),
        )
        return self._work

    def done(self, result: Any) -> None:
        """The work ``received`` asked for ended with ``result``."""
        work, self._work = self._work, None
        if isinstance(work, Present):
            self._answered(*result)
        elif isinstance(work, Collect):
            self._carrier = None  # its transfer is over: nothing left to discard

    def _answered(self, carrier: Carrier | None, broke: OSError | None) -> None:
        self._carrier, self._broke = carrier, broke
        self._chunks_follow(carrier is None and broke is None)

    def finish(self) -> Received[Any]:
        """The response, once every part has arrived."""
        if self._broke is not None:
            raise UnavailableError(f"the data connection broke: {self._broke}")
        return self.receiver.finish()

    def abandon(self) -> None:
        """The attempt failed: the request side stops waiting, and a connection in
        use is closed (what is left on it is unknown)."""
        self._chunks_follow(False)
        carrier, self._carrier = self._carrier, None
        discard(carrier)
