"""The ticket exchange of a streamed attempt, driven by hand: no server, no sockets.

TicketExchange is told each response part and what its work ended with; these tests
play the server's side with real wire parts, and stand in for the work (presenting a
ticket, collecting a response's payloads) the twins run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorwire import _messages
from tensorwire._transport.calls import CallState, Reporter
from tensorwire._transport.dataport import ASK_DATA, DataLinks, DataRoute
from tensorwire._transport.ticket_exchange import Collect, Present, TicketExchange
from tensorwire.errors import InvalidArgumentError, UnavailableError
from tensorwire.types import Progress
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.codec import Encoder
from tensorwire.wire.streaming import StreamReceiver

X = np.arange(1000, dtype=np.float32)
Y = np.arange(500, dtype=np.int64)
CHUNK = 1024


class FakeCarrier:
    """A data connection that carries ``payload`` as the response's payloads."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = memoryview(payload)
        self.received = 0
        self.discarded = 0

    def receive(self, receiver: StreamReceiver[Any], timeout: float | None) -> None:
        self.received += 1
        sent = 0

        def read_into(view: memoryview) -> int:
            nonlocal sent
            n = min(view.nbytes, self.payload.nbytes - sent)
            view[:n] = self.payload[sent : sent + n]
            sent += n
            return n

        receiver.fill(read_into)

    def discard(self) -> None:
        self.discarded += 1


class Exchange:
    """A TicketExchange of one Infer call, and what its request side was told."""

    def __init__(self, data_port: bool = True, host: str | None = "127.0.0.1") -> None:
        self.progress: list[Progress] = []
        encoder = _messages.infer_request("identity", {"x": X}, None, 0, False)
        self.call = CallState(
            "Infer", encoder, Reporter(self.progress.append), None, True, methods={"m": 1}
        )
        self.links = DataLinks(host, None, None)
        route = DataRoute({"r": 2}, self.links) if data_port else None
        self.told: list[bool] = []
        self.exchange = TicketExchange(self.call, route, CHUNK, self.told.append)
        self.header, self.payloads = encoder.header()


def response() -> tuple[bytes, bytes, list[bytes]]:
    """The response's header part, its payload bytes, and its chunk parts."""
    encoder = Encoder(pb.InferResponse())
    encoder.named(encoder.message.outputs.add(), "y", Y)
    header, payloads = encoder.header()
    chunks = list(streaming.chunk_parts(payloads, CHUNK))
    return streaming.header_part(header), b"".join(bytes(p) for p in payloads), chunks


def ticket_part(**fields: Any) -> bytes:
    body = pb.DataTransfer(**fields).SerializeToString()
    return framing.part(framing.PART_DATA, [body], len(body))


def outputs(exchange: TicketExchange) -> dict[str, np.ndarray]:
    received = exchange.finish()
    return _messages.owned(received, received.message.outputs)


def joined(parts: list[bytes]) -> bytes:
    """The payload bytes that chunk parts carry."""
    out = b""
    for raw in parts:
        number, body = framing.split_part(raw)
        assert number == framing.PART_CHUNK
        out += bytes(body)
    return out


def test_without_a_route_every_part_goes_through_grpc() -> None:
    t = Exchange(data_port=False)
    exchange = t.exchange
    assert not exchange.asks and exchange.methods == {"m": 1}
    assert exchange.method == "InferStream"
    sent = list(exchange.opening)
    assert sent[0] == streaming.header_part(t.header)
    assert joined(sent[1:]) == X.tobytes()
    assert list(exchange.chunks) == []
    header, _, chunks = response()
    for raw in [header, *chunks]:
        assert exchange.received(raw) is None
    assert t.call.responded
    np.testing.assert_array_equal(outputs(exchange)["y"], Y)
    assert t.told == []


def test_without_a_route_a_data_part_is_out_of_place() -> None:
    exchange = Exchange(data_port=False).exchange
    header, _, _ = response()
    exchange.received(header)
    with pytest.raises(InvalidArgumentError, match="data-plane part out of place"):
        exchange.received(ticket_part(ticket=b"t", port=1))


def test_the_request_asks_for_a_ticket_after_its_header() -> None:
    t = Exchange()
    exchange = t.exchange
    assert exchange.asks and exchange.methods == {"r": 2}  # the route's replica
    assert list(exchange.opening) == [streaming.header_part(t.header), ASK_DATA]
    assert t.progress == []  # nothing uploaded yet


def test_a_server_without_a_data_port_gets_chunks_and_the_client_falls_back() -> None:
    t = Exchange()
    exchange = t.exchange
    assert t.links.usable()
    assert exchange.received(ticket_part()) is None  # no ticket, no port
    assert t.told == [True]
    assert not t.links.usable()  # gRPC only, for a while
    assert joined(list(exchange.chunks)) == X.tobytes()
    assert t.progress[-1] == Progress("upload", X.nbytes, X.nbytes)
    header, _, chunks = response()
    for raw in [header, *chunks]:
        assert exchange.received(raw) is None
    np.testing.assert_array_equal(outputs(exchange)["y"], Y)


def test_a_busy_data_port_gets_chunks_for_this_call_only() -> None:
    t = Exchange()
    assert t.exchange.received(ticket_part(port=4321)) is None  # no ticket: busy
    assert t.told == [True]
    assert t.links.usable()
    assert not t.call.responded  # the answer to the ask is no response data


def test_a_ticket_is_presented_and_the_response_collected_on_its_carrier() -> None:
    t = Exchange()
    exchange = t.exchange
    work = exchange.received(ticket_part(ticket=b"tk", port=4321, payload_bytes=X.nbytes))
    assert isinstance(work, Present)
    assert work.transfer.ticket == b"tk" and work.links is t.links
    assert [bytes(p) for p in work.payloads] == [bytes(p) for p in t.payloads]
    assert work.receiver is exchange.receiver and work.chunk_size == CHUNK
    header, payload, _ = response()
    carrier = FakeCarrier(payload)
    exchange.done((carrier, None))
    assert t.told == [False]  # the payloads went on the data connection
    assert exchange.received(header) is None
    assert t.call.responded
    collect = exchange.received(ticket_part())  # the payloads follow on the connection
    assert isinstance(collect, Collect) and collect.carrier is carrier
    collect(5.0)
    exchange.done(None)
    assert carrier.received == 1
    np.testing.assert_array_equal(outputs(exchange)["y"], Y)
    exchange.abandon()  # a later failure: the pooled connection is not closed
    assert carrier.discarded == 0


def test_a_ticket_no_connection_took_sends_chunks() -> None:
    t = Exchange()
    assert isinstance(t.exchange.received(ticket_part(ticket=b"tk", port=1)), Present)
    t.exchange.done((None, None))
    assert t.told == [True]
    assert joined(list(t.exchange.chunks)) == X.tobytes()


def test_a_connection_that_broke_fails_the_attempt() -> None:
    t = Exchange()
    exchange = t.exchange
    assert exchange.received(ticket_part(ticket=b"tk", port=1)) is not None
    broke = ConnectionResetError("reset by peer")
    exchange.done((None, broke))
    assert t.told == [False]  # no chunks: the server's status says why
    header, _, _ = response()
    exchange.received(header)
    with pytest.raises(UnavailableError, match="the data connection broke") as caught:
        exchange.received(ticket_part())
    assert caught.value.__cause__ is broke


def test_a_response_that_ends_after_a_broken_connection_is_unavailable() -> None:
    t = Exchange()
    t.exchange.received(ticket_part(ticket=b"tk", port=1))
    t.exchange.done((None, ConnectionResetError("reset")))
    with pytest.raises(UnavailableError, match="the data connection broke: reset"):
        t.exchange.finish()


def test_an_abandoned_attempt_closes_its_connection_and_stops_the_request_side() -> None:
    t = Exchange()
    t.exchange.received(ticket_part(ticket=b"tk", port=1))
    carrier = FakeCarrier()
    t.exchange.done((carrier, None))
    t.exchange.abandon()
    assert carrier.discarded == 1
    assert t.told == [False, False]
    t.exchange.abandon()
    assert carrier.discarded == 1  # once


def test_a_collect_cut_short_closes_the_connection() -> None:
    t = Exchange()
    t.exchange.received(ticket_part(ticket=b"tk", port=1))
    header, _, _ = response()
    carrier = FakeCarrier()
    t.exchange.done((carrier, None))
    t.exchange.received(header)
    assert isinstance(t.exchange.received(ticket_part()), Collect)
    t.exchange.abandon()  # e.g. the caller cancelled while the payloads arrived
    assert carrier.discarded == 1


def test_a_presentation_answered_too_late_closes_what_it_got() -> None:
    t = Exchange()
    work = t.exchange.received(ticket_part(ticket=b"tk", port=1))
    assert isinstance(work, Present)
    carrier = FakeCarrier()
    work.abandoned((carrier, None))
    assert carrier.discarded == 1
    work.abandoned((None, OSError("gone")))  # nothing to close
