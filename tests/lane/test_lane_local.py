"""The fast lane on the server's host (issue 33): the lane's abstract Unix socket, taken
by a client in the server's network namespace instead of loopback TCP; the data port
where the socket is not there; and a process that took the socket's name never sees a
call (the server proves itself with the grant's ``local_proof``)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import engine_server, on_device
from conftest import server_address as address

import tensorwire as tw
from tensorwire._transport.lane_pool import Lane
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.v1 import tensorwire_pb2_grpc as pb_grpc
from tensorwire.wire import lane
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

TIMEOUT = 20
SMALL = np.arange(16, dtype=np.float32).reshape(1, 16)

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(on_device(Settings(device="cpu")))


served = contextlib.contextmanager(engine_server)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    with served(engine) as running:
        yield running


def lane_of(client: tw.Client | tw.AsyncClient) -> Lane:
    return client._transport._methods["Infer"].lane  # type: ignore[no-any-return]


def family(client: tw.Client) -> socket.AddressFamily:
    """The address family of the connection ``client``'s lane pooled last."""
    pool = lane_of(client)
    sock = pool.take()
    assert sock is not None
    try:
        return sock.family
    finally:
        pool.give(sock)


@contextlib.contextmanager
def local_name(server: TensorwireServer, name: str) -> Iterator[None]:
    """Grants name ``name`` as the lane's Unix socket for a while."""
    assert server.lane is not None
    kept = server.lane.local_name
    server.lane.local_name = name
    try:
        yield
    finally:
        server.lane.local_name = kept


def test_a_client_on_the_host_takes_the_unix_socket(server: TensorwireServer) -> None:
    assert server.lane is not None and server.lane.local_name
    before = server.lane.answered
    with grpc.insecure_channel(address(server)) as channel:
        grant = pb_grpc.TensorServiceStub(channel).OpenLane(pb.OpenLaneRequest(), timeout=TIMEOUT)
    assert grant.local_socket == server.lane.local_name
    assert len(grant.local_proof) == lane.GRANT_BYTES
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        for _ in range(3):
            np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
        assert family(client) == socket.AF_UNIX
        assert lane_of(client).far == ""

    async def calls() -> None:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, fast_lane=True) as aclient:
            outs = await asyncio.gather(*(aclient.infer("identity", SMALL) for _ in range(4)))
            for out in outs:
                np.testing.assert_array_equal(out["output"], SMALL)
            reader, writer = lane_of(aclient).take()
            assert writer.get_extra_info("socket").family == socket.AF_UNIX
            lane_of(aclient).give((reader, writer))

    asyncio.run(calls())
    assert server.lane.answered - before >= 7


def test_a_socket_not_here_sends_the_lane_to_the_data_port(server: TensorwireServer) -> None:
    """As a client on another host (or network namespace) finds it: nothing there."""
    absent = f"tensorwire-lane-{secrets.token_hex(16)}"
    with (
        local_name(server, absent),
        tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client,
    ):
        before = server.lane.answered  # type: ignore[union-attr]
        np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
        assert lane_of(client).far == absent  # remembered: no second try
        assert family(client) == socket.AF_INET
        assert server.lane.answered - before == 1  # type: ignore[union-attr]

    async def call() -> None:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, fast_lane=True) as aclient:
            np.testing.assert_array_equal((await aclient.infer("identity", SMALL))["output"], SMALL)
            assert lane_of(aclient).far == absent

    with local_name(server, absent):
        asyncio.run(call())


class Squatter:
    """A process (here: a thread) that took a Unix socket's name: it accepts, answers
    the grant with a wrong proof, and keeps whatever else it is sent."""

    def __init__(self) -> None:
        self.name = f"tensorwire-lane-{secrets.token_hex(16)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.name)
        self.listener.listen(8)
        self.listener.settimeout(TIMEOUT)
        self.opened = b""
        self.after = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            self.opened = conn.recv(len(lane.OPENING) + lane.HELLO.size, socket.MSG_WAITALL)
            conn.sendall(lane.ACCEPTED + bytes(lane.GRANT_BYTES))
            while piece := conn.recv(65536):
                self.after += piece

    def close(self) -> None:
        self.thread.join(TIMEOUT)
        self.listener.close()


@pytest.mark.parametrize("kind", ["blocking", "async"])
def test_a_process_that_took_the_name_never_sees_a_call(
    server: TensorwireServer, kind: str
) -> None:
    squatter = Squatter()
    try:
        with local_name(server, squatter.name):
            if kind == "blocking":
                with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
                    out = client.infer("identity", SMALL)["output"]  # by gRPC: grant spent
                    np.testing.assert_array_equal(out, SMALL)
                    assert lane_of(client).far == squatter.name
                    client.infer("identity", SMALL)
                    assert family(client) == socket.AF_INET  # then the data port
            else:

                async def call() -> None:
                    async with tw.AsyncClient(
                        address(server), timeout=TIMEOUT, fast_lane=True
                    ) as aclient:
                        out = (await aclient.infer("identity", SMALL))["output"]
                        np.testing.assert_array_equal(out, SMALL)
                        assert lane_of(aclient).far == squatter.name

                asyncio.run(call())
    finally:
        squatter.close()
    assert squatter.opened.startswith(lane.OPENING)  # it had the (now spent) grant...
    assert bytes(squatter.after) == b""  # ...and not a byte of any call


def test_without_same_host_there_is_no_unix_socket(engine) -> None:  # type: ignore[no-untyped-def]
    with served(engine, same_host=False) as plain:
        assert plain.lane is not None and plain.lane.local_name == ""
        with tw.Client(address(plain), timeout=TIMEOUT, fast_lane=True) as client:
            np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
            assert family(client) == socket.AF_INET


def test_a_wrong_opening_on_the_unix_socket_is_closed(server: TensorwireServer) -> None:
    assert server.lane is not None
    for opening in (b"TWD1", b"GET ", bytes(4)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect("\0" + server.lane.local_name)
            sock.sendall(opening + bytes(lane.HELLO.size))
            assert sock.recv(64) == b""  # closed, nothing said
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)


@pytest.mark.parametrize("size", [100 << 10, 1 << 20, (2 << 20) - 4096])  # below streaming
def test_large_calls_answer_the_callers_own_arrays(server: TensorwireServer, size: int) -> None:
    """Bodies read straight into their own buffers, answers kept as the caller's arrays
    (views of the call's own receive buffer, or copies where not aligned)."""
    x = np.arange(size // 4, dtype=np.float32)
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        before = server.lane.answered  # type: ignore[union-attr]
        first = client.infer("identity", x)["output"]
        second = client.infer("identity", x + 1)["output"]
        assert server.lane.answered - before == 2  # type: ignore[union-attr]
        np.testing.assert_array_equal(first, x)
        np.testing.assert_array_equal(second, x + 1)
        assert first.flags.writeable and first.flags.aligned
        first[:] = -1  # the caller's own: no other answer shares it
        np.testing.assert_array_equal(second, x + 1)
        np.testing.assert_array_equal(client.infer("identity", x)["output"], x)

    async def calls() -> None:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, fast_lane=True) as aclient:
            outs = await asyncio.gather(*(aclient.infer("identity", x + i) for i in range(3)))
            for i, out in enumerate(outs):
                np.testing.assert_array_equal(out["output"], x + i)
                assert out["output"].flags.writeable

    asyncio.run(calls())
