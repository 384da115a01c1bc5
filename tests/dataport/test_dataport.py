"""The data port: streamed payloads over a TCP connection beside gRPC, with tickets,
TLS as gRPC has it, and chunks through gRPC whenever it cannot be had. (These
servers offer no same-host transfers, which a client on their host would prefer:
tests/dataport/test_same_host.py has those.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from conftest import engine_server, on_device
from conftest import server_address as address

import tensorwire as tw
from tensorwire import _messages
from tensorwire._transport.dataport import ASK_DATA
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.dataport import ACCEPTED, REQUEST, REQUEST_MAGIC, RESPONSE, recv_exact
from tensorwire_server.dataport.listener import DataPort
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

TIMEOUT = 60
BIG = np.arange(3 << 20, dtype=np.float32).reshape(3, -1)  # 12 MiB: streamed


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(on_device(Settings(device="cpu")))


def serving(engine, **settings: object) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    """engine_server, without same-host transfers unless asked for."""
    yield from engine_server(engine, **{"same_host": False, **settings})


@pytest.fixture
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    yield from serving(engine)  # the data port is on by default, on a free port


def transfers(plane: DataPort | None) -> int:
    """Transfers over the data port."""
    assert plane is not None
    return plane.moved["tcp"][0]


def test_streamed_calls_move_their_payloads_over_the_data_plane(server: TensorwireServer) -> None:
    plane = server.dataport
    assert plane is not None
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        out = client.infer("identity", BIG)["output"]
        np.testing.assert_array_equal(out, BIG)
        assert out.flags.writeable and out.flags.c_contiguous
        assert transfers(plane) == 1
        assert plane.moved["tcp"][1] == 2 * BIG.nbytes
        # The same connection again, for every streamed method.
        result = client.call("add", BIG, BIG)
        np.testing.assert_array_equal(result, BIG + BIG)
        grads = client.call_grad("sum", BIG)
        np.testing.assert_array_equal(next(iter(grads.grads.values())), np.ones_like(BIG))
        assert transfers(plane) == 3
        # Small calls stay unary, in gRPC.
        client.infer("identity", np.ones(4, np.float32))
        assert transfers(plane) == 3


def test_the_async_client_uses_the_data_plane_too(server: TensorwireServer) -> None:
    async def main() -> np.ndarray:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT) as client:
            first = await client.infer("identity", BIG)
            together = await asyncio.gather(*(client.infer("identity", BIG * k) for k in range(3)))
            for k, got in enumerate(together):
                np.testing.assert_array_equal(got["output"], BIG * k)
            return first["output"]

    np.testing.assert_array_equal(asyncio.run(main()), BIG)
    assert server.dataport is not None and transfers(server.dataport) == 4


def test_a_server_without_a_data_plane_gets_chunks(engine) -> None:  # type: ignore[no-untyped-def]
    for plain in serving(engine, data_plane=False):
        assert plain.dataport is None
        with tw.Client(address(plain), timeout=TIMEOUT) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
            assert not client._transport._data.links.usable()  # remembered for a while


def test_an_unreachable_data_port_falls_back_to_chunks(server: TensorwireServer) -> None:
    assert server.dataport is not None
    server.dataport.close()  # as a firewall would: nothing answers on the port
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert not client._transport._data.links.usable()
        np.testing.assert_array_equal(client.infer("identity", BIG + 1)["output"], BIG + 1)


def test_the_client_can_keep_payloads_in_grpc(server: TensorwireServer) -> None:
    with tw.Client(address(server), timeout=TIMEOUT, data_plane=False) as client:
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
    assert server.dataport is not None and transfers(server.dataport) == 0


def test_a_data_port_that_answers_for_another_server_falls_back(engine) -> None:  # type: ignore[no-untyped-def]
    """A port mapped to another replica (or a balancer in between): that server does
    not know the ticket, says nothing, and the client sends chunks instead, before a
    payload byte went astray."""
    for one in serving(engine):
        for other in serving(engine):
            assert one.dataport is not None and other.dataport is not None
            with tw.Client(address(one), timeout=TIMEOUT) as client:
                links = client._transport._data.links
                ticket = pb.DataTransfer(ticket=os.urandom(16), port=other.dataport.port)
                assert links.send(ticket, [memoryview(BIG)], TIMEOUT, 1 << 20) is None
                assert not links.usable()
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
            assert transfers(other.dataport) == transfers(one.dataport) == 0


# ------------------------------------------------------------ tickets, by hand


class Asking:
    """An InferStream call that asks for the data port, driven by hand."""

    def __init__(
        self,
        server: TensorwireServer,
        array: np.ndarray,
        chunks: bool = False,
        timeout: float = TIMEOUT,
    ) -> None:
        encoder = _messages.infer_request("identity", array, None, 0, False)
        parts = streaming.parts(encoder)
        self.header = next(parts)
        self.chunks = list(parts) if chunks else []
        self.payloads = encoder.header()[1]
        self.done = threading.Event()
        self.channel = grpc.insecure_channel(address(server))
        method = self.channel.stream_stream("/tensorwire.v1.TensorService/InferStream")
        self.responses = method(self.requests(), timeout=timeout)
        number, body = framing.split_part(next(self.responses))
        assert number == framing.PART_DATA
        self.ticket = pb.DataTransfer.FromString(bytes(body))
        self.port = server.dataport.port  # type: ignore[union-attr]

    def requests(self) -> Iterator[bytes]:
        yield self.header
        yield ASK_DATA
        self.done.wait(TIMEOUT)
        yield from self.chunks

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def close(self) -> None:
        self.done.set()
        self.channel.close()


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_ticket_is_single_use_and_bound_to_its_bytes(server: TensorwireServer) -> None:
    asking = Asking(server, BIG)
    try:
        assert len(asking.ticket.ticket) >= 16 and asking.ticket.payload_bytes == BIG.nbytes
        with asking.connect() as first:
            first.sendall(REQUEST.pack(REQUEST_MAGIC, asking.ticket.ticket))
            assert recv_exact(first, len(ACCEPTED)) == ACCEPTED
            with asking.connect() as replay:  # the same ticket again: dropped
                replay.sendall(REQUEST.pack(REQUEST_MAGIC, asking.ticket.ticket))
                assert closed_by_server(replay)
            for payload in asking.payloads:
                first.sendall(payload)
            asking.done.set()  # half-close: the payloads are on their way
            number, _ = framing.split_part(next(asking.responses))
            assert number == framing.PART_HEADER
            number, _ = framing.split_part(next(asking.responses))
            assert number == framing.PART_DATA
            _, size = RESPONSE.unpack(recv_exact(first, RESPONSE.size))
            assert size == BIG.nbytes
            out = np.empty_like(BIG)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < size:
                got += first.recv_into(view[got:])
            np.testing.assert_array_equal(out, BIG)
    finally:
        asking.close()


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"",  # connects and goes
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # another protocol
        REQUEST.pack(REQUEST_MAGIC, bytes(16)),  # a ticket never issued
        os.urandom(4096),
    ],
)
def test_anything_but_a_live_ticket_is_dropped(
    server: TensorwireServer, first_bytes: bytes
) -> None:
    assert server.dataport is not None
    with socket.create_connection(("127.0.0.1", server.dataport.port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(ConnectionError):  # dropped while we still sent
            sock.sendall(first_bytes)
        if first_bytes:
            assert closed_by_server(sock)
    with tw.Client(address(server), timeout=TIMEOUT) as client:  # and it serves on
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)


def test_a_connection_cut_mid_transfer_fails_that_call_only(server: TensorwireServer) -> None:
    asking = Asking(server, BIG)
    try:
        with asking.connect() as sock:
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, asking.ticket.ticket))
            sock.sendall(asking.payloads[0][: BIG.nbytes // 2])
        asking.done.set()
        with pytest.raises(grpc.RpcError) as caught:
            list(asking.responses)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "data connection" in caught.value.details()
    finally:
        asking.close()
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)


def test_a_call_that_ends_mid_transfer_cuts_its_connection(server: TensorwireServer) -> None:
    """The deadline passes while the payload is half sent: the call fails, and the
    server closes the connection at once rather than keep the buffers for it."""
    asking = Asking(server, BIG, timeout=1.5)
    try:
        with asking.connect() as sock:
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, asking.ticket.ticket))
            assert recv_exact(sock, len(ACCEPTED)) == ACCEPTED
            sock.sendall(asking.payloads[0][: BIG.nbytes // 2])
            asking.done.set()
            with pytest.raises(grpc.RpcError) as caught:
                list(asking.responses)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            sock.settimeout(10)
            assert closed_by_server(sock)
    finally:
        asking.close()


def test_chunks_after_a_ticket_withdraw_it(server: TensorwireServer) -> None:
    """A client that got a ticket but could not connect sends chunks: the ticket is
    withdrawn, and the call answers from the chunks."""
    asking = Asking(server, BIG, chunks=True)
    try:
        asking.done.set()
        receiver = streaming.StreamReceiver(pb.InferResponse)
        for raw in asking.responses:
            receiver.feed(raw)
        out = receiver.finish()
        np.testing.assert_array_equal(out.named(out.message.outputs, "output")[0][1], BIG)
        with asking.connect() as late:  # the ticket is no good any more
            late.sendall(REQUEST.pack(REQUEST_MAGIC, asking.ticket.ticket))
            assert closed_by_server(late)
    finally:
        asking.close()


# ---------------------------------------------------------------- TLS


def test_the_data_plane_speaks_tls_when_grpc_does(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls = {"tls_cert": str(cert_file), "tls_key": str(key_file)}
    for secured in serving(engine, **tls):
        plane = secured.dataport
        assert plane is not None and plane.tls is not None
        with socket.create_connection(("127.0.0.1", plane.port), timeout=TIMEOUT) as raw:
            raw.sendall(REQUEST.pack(REQUEST_MAGIC, bytes(16)))  # plain text: refused
            assert closed_by_server(raw)
        with tw.Client(
            address(secured), timeout=TIMEOUT, root_certificates=ca.cert_pem.bytes()
        ) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert transfers(plane) == 1


def test_mutual_tls_holds_on_the_data_plane(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client@tensorwire.test")
    files = {
        "tls_cert": server_cert.cert_chain_pems[0],
        "tls_key": server_cert.private_key_pem,
        "tls_client_ca": ca.cert_pem,
    }
    settings = {}
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
        settings[name] = str(tmp_path / name)
    for secured in serving(engine, **settings):
        plane = secured.dataport
        assert plane is not None
        with tw.Client(
            address(secured),
            timeout=TIMEOUT,
            root_certificates=ca.cert_pem.bytes(),
            certificate_chain=client_cert.cert_chain_pems[0].bytes(),
            private_key=client_cert.private_key_pem.bytes(),
        ) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert transfers(plane) == 1
        # Without a client certificate the handshake fails: no ticket is read.
        anonymous = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
        with (
            socket.create_connection(("127.0.0.1", plane.port), timeout=TIMEOUT) as raw,
            pytest.raises((ssl.SSLError, ConnectionError)),
            anonymous.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(REQUEST.pack(REQUEST_MAGIC, bytes(16)))
            if tls.recv(1) == b"":
                raise ConnectionError("closed")


def test_metrics_count_what_the_data_plane_moved(server: TensorwireServer) -> None:
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        client.infer("identity", BIG)
    registry = server.metrics.registry
    assert registry.get_sample_value("tensorwire_data_plane_transfers_total", {"path": "tcp"}) == 1
    assert (
        registry.get_sample_value("tensorwire_data_plane_bytes_total", {"path": "tcp"})
        == 2 * BIG.nbytes
    )


def test_several_replicas_each_take_their_own_tickets(engine) -> None:  # type: ignore[no-untyped-def]
    """A ticket is good only on the server that issued it: with a target of several
    replicas, each streamed call goes to one replica, its payloads to that replica's
    data port; a session's calls to the session's replica."""
    for one in serving(engine):
        for other in serving(engine):
            planes = [one.dataport, other.dataport]
            target = [address(one), address(other)]
            streamed = np.arange(3 << 18, dtype=np.float32)  # 3 MiB: just past the threshold
            with tw.Client(target, timeout=TIMEOUT) as client:
                # Replicas are chosen at random: all 32 on one would happen 1 in 2**31.
                for k in range(32):
                    out = client.infer("identity", streamed + k)["output"]
                    np.testing.assert_array_equal(out, streamed + k)
                counts = [transfers(plane) for plane in planes]  # type: ignore[union-attr]
                assert sum(counts) == 32 and all(counts), counts  # both served some
                remote = client.put(BIG)  # a session's call: streamed to its replica
                np.testing.assert_array_equal(client.get(remote), BIG)  # streamed back
                assert sum(transfers(plane) for plane in planes) == 34  # type: ignore[union-attr]
