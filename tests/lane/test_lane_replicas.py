"""The fast lane and replicas: a target that reaches one server takes the lane, one
whose name resolves to several replicas leaves its calls to gRPC's round robin (a lane
would hold them all on the replica its connections reached, and a grant is good only
on the replica that gave it); a lane connection gives up on a server that stops
acknowledging, as gRPC's connections do."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import TOY_MODELS, engine_server, on_device

import tensorwire as tw
from tensorwire._transport import lane as client_lane
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

SMALL = np.ones((1, 16), np.float32)


@pytest.fixture(scope="module")
def server() -> Iterator[TensorwireServer]:
    engine = build_engine(on_device(Settings(device="cpu", models=TOY_MODELS)))
    # Replicas are other hosts: no lane Unix socket (same_host off), the data port's TCP.
    with contextlib.contextmanager(engine_server)(engine, same_host=False) as running:
        yield running


def lane_of(client: tw.Client) -> client_lane.Lane:
    return client._transport._methods["Infer"].lane  # type: ignore[no-any-return]


def answered(server: TensorwireServer) -> int:
    assert server.lane is not None
    return server.lane.answered


def test_a_name_of_one_server_takes_the_lane(server: TensorwireServer) -> None:
    before = answered(server)
    with tw.Client(f"localhost:{server.port}", timeout=20, fast_lane=True) as client:
        for _ in range(3):
            client.infer("identity", SMALL)
        sock = lane_of(client).take()
        assert sock is not None
        # Unacknowledged bytes end the connection in the keepalive timeout (20 s).
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 20_000
        lane_of(client).give(sock)
    assert answered(server) - before >= 3


def test_a_name_of_several_replicas_leaves_calls_to_grpc(server: TensorwireServer) -> None:
    with tw.Client(f"localhost:{server.port}", timeout=20, fast_lane=True) as client:
        lane = lane_of(client)
        # The name now resolves to two replicas (as a fleet's DNS name does when it grows).
        lane.resolve = lambda: [f"127.0.0.1:{server.port}", f"127.0.0.2:{server.port}"]
        lane._one = (float("-inf"), True)
        before = answered(server)
        for _ in range(3):
            np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
        assert answered(server) == before  # every call over gRPC
        assert not lane.usable(SMALL.nbytes)
