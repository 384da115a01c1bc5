"""Attacks on the fast lane (issue 33), as test_attack_dataport.py makes on the data
port: whoever reaches the data port can open lane connections and send any bytes. The
server must close what is not a live grant or a well-formed frame, never crash, hold
no more than its bounds, and run nothing outside the grant's identity and scopes."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from conftest import engine_server, on_device
from conftest import server_address as address

import tensorwire as tw
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.v1 import tensorwire_pb2_grpc as pb_grpc
from tensorwire.wire import lane
from tensorwire.wire.codec import Encoder
from tensorwire.wire.lane import ACCEPTED, HELLO, HELLO_MAGIC, OPENING, RESPONSE
from tensorwire_server.lane import connection as server_lane
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

TIMEOUT = 20
SMALL = np.ones((1, 16), np.float32)
TOKENS = (
    "alice * alice-token-0123456789abcdef;"
    "reader call reader-token-0123456789abcdef"  # may Call, may not Infer
)
INFER = "/tensorwire.v1.TensorService/Infer"


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(on_device(Settings(device="cpu")))


served = contextlib.contextmanager(engine_server)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    with served(engine, tokens=TOKENS, fast_lane_connections=24) as running:
        yield running


def grant(server: TensorwireServer, token: str) -> bytes:
    """A fresh grant, asked over gRPC as ``token``."""
    with grpc.insecure_channel(address(server)) as channel:
        response = pb_grpc.TensorServiceStub(channel).OpenLane(
            pb.OpenLaneRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=TIMEOUT
        )
    return bytes(response.grant)


#: Where a lane connection opens: the data port, or the lane's Unix socket (this host).
PATHS = ("tcp", "unix")


def connect(server: TensorwireServer, via: str = "tcp") -> socket.socket:
    """A connection that sent the lane's opening: to the data port, or (``via``
    "unix") to the lane's abstract Unix socket."""
    assert server.dataport is not None and server.lane is not None
    if via == "unix":
        assert server.lane.local_name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect("\0" + server.lane.local_name)
    else:
        sock = socket.create_connection(("127.0.0.1", server.dataport.port), timeout=TIMEOUT)
    sock.sendall(OPENING)
    return sock


def opened(
    server: TensorwireServer, token: str = "alice-token-0123456789abcdef", via: str = "tcp"
) -> socket.socket:
    """A lane connection the server accepted (on the Unix socket, with its proof)."""
    sock = connect(server, via)
    sock.sendall(HELLO.pack(HELLO_MAGIC, grant(server, token)))
    assert sock.recv(len(ACCEPTED), socket.MSG_WAITALL) == ACCEPTED
    if via == "unix":
        assert len(sock.recv(lane.GRANT_BYTES, socket.MSG_WAITALL)) == lane.GRANT_BYTES
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (whatever it sent before)."""
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def call(
    sock: socket.socket,
    body: bytes,
    method: str = INFER,
    meta: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> tuple[int, str]:
    """Send one request frame; the answer's status code and message."""
    sock.sendall(b"".join(lane.request_frame(7, method, 5.0, lane.pairs(meta), body)))
    head = sock.recv(RESPONSE.size, socket.MSG_WAITALL)
    _, call_id, code, d, m, b = RESPONSE.unpack(head)
    rest = sock.recv(d + m + b, socket.MSG_WAITALL) if d + m + b else b""
    assert call_id == 7
    return code, rest[:d].decode()


def infer_body(model: str = "identity") -> bytes:
    from tensorwire import _messages

    return _messages.infer_request(model, {"input": SMALL}, None, 0, False).finish()  # type: ignore[arg-type]


def serves(server: TensorwireServer) -> None:
    """The server still answers an honest client on the lane."""
    with tw.Client(
        address(server), timeout=TIMEOUT, fast_lane=True, token="alice-token-0123456789abcdef"
    ) as c:
        np.testing.assert_array_equal(c.infer("identity", SMALL)["output"], SMALL)


@pytest.mark.parametrize("via", PATHS)
def test_random_bytes_and_bad_grants_are_closed(server: TensorwireServer, via: str) -> None:
    rng = random.Random(33)
    for size in (1, 3, 19, 20, 64, 4096):
        with connect(server, via) as sock:
            sock.sendall(rng.randbytes(size))
            assert closed_by_server(sock)
    good = grant(server, "alice-token-0123456789abcdef")
    with connect(server, via) as sock:  # a grant with the wrong magic
        sock.sendall(HELLO.pack(b"TWD1", good))
        assert closed_by_server(sock)
    replayed = good  # still good: a wrong opening spends no grant; once, though
    first = connect(server, via)
    first.sendall(HELLO.pack(HELLO_MAGIC, replayed))
    assert first.recv(4, socket.MSG_WAITALL) == ACCEPTED
    with connect(server, via) as again:
        again.sendall(HELLO.pack(HELLO_MAGIC, replayed))
        assert closed_by_server(again)
    first.close()
    assert server.lane is not None
    server.lane.grants.seconds = 0.05
    try:
        lapsed = grant(server, "alice-token-0123456789abcdef")
        time.sleep(0.2)
        with connect(server, via) as sock:
            sock.sendall(HELLO.pack(HELLO_MAGIC, lapsed))
            assert closed_by_server(sock)
    finally:
        server.lane.grants.seconds = 10.0
    serves(server)


def test_a_grant_is_its_tokens_and_no_more(server: TensorwireServer) -> None:
    with opened(server, "reader-token-0123456789abcdef") as sock:
        code, message = call(sock, infer_body())
        assert grpc.StatusCode(code_of(code)) is grpc.StatusCode.PERMISSION_DENIED
        assert "lacks the 'infer' scope" in message
        # A token in the frame's metadata is dropped, never taken for the grant's.
        elevated = [("authorization", "Bearer alice-token-0123456789abcdef")]
        code, _ = call(sock, infer_body(), meta=elevated)
        assert grpc.StatusCode(code_of(code)) is grpc.StatusCode.PERMISSION_DENIED
        # Methods the lane does not carry: UNIMPLEMENTED, and the connection stays.
        for method in (
            "/tensorwire.v1.TensorService/OpenLane",
            "/tensorwire.v1.TensorService/InferStream",
            "/grpc.health.v1.Health/Check",
            "/tensorwire.v1.TensorService/Nope",
        ):
            code, _ = call(sock, b"", method=method)
            assert grpc.StatusCode(code_of(code)) is grpc.StatusCode.UNIMPLEMENTED
        code, _ = call(sock, Encoder(pb.CallRequest(function="add")).finish(), method=CALL)
        assert grpc.StatusCode(code_of(code)) is grpc.StatusCode.INVALID_ARGUMENT


CALL = "/tensorwire.v1.TensorService/Call"


def test_a_grant_is_the_matched_tokens_when_names_repeat(engine) -> None:  # type: ignore[no-untyped-def]
    # Rotation: two lines may share a name. The broad one comes first; the narrow
    # token's lane must be the narrow line's, not the first line with its name.
    rotated = "bob * bob-broad-token-0123456789abcdef;bob call bob-narrow-token-0123456789abcdef"
    with served(engine, tokens=rotated) as running:
        with opened(running, "bob-narrow-token-0123456789abcdef") as sock:
            code, message = call(sock, infer_body())
            assert grpc.StatusCode(code_of(code)) is grpc.StatusCode.PERMISSION_DENIED
            assert "lacks the 'infer' scope" in message
        with opened(running, "bob-broad-token-0123456789abcdef") as sock:
            code, _ = call(sock, infer_body())
            assert grpc.StatusCode(code_of(code)) is grpc.StatusCode.OK


def code_of(number: int) -> tuple[int, str]:
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


@pytest.mark.parametrize("via", PATHS)
def test_frames_past_limits_close_the_connection(server: TensorwireServer, via: str) -> None:
    assert server.lane is not None
    head = lane.REQUEST
    for frame in (
        head.pack(b"TWQ1", 1, 1.0, 10, 0, server.lane.max_request_bytes + 1),  # too big a body
        head.pack(b"TWQ1", 1, 1.0, lane.MAX_METHOD + 1, 0, 0),  # too long a method
        head.pack(b"TWQ1", 1, 1.0, 10, lane.MAX_METADATA + 1, 0),  # too much metadata
        head.pack(b"XXXX", 1, 1.0, 10, 0, 0),  # not a frame
        head.pack(b"TWQ1", 1, 1.0, 4, 5, 0) + b"/a/b" + b"\xff\xff\xff\xff\xff",  # bad pairs
    ):
        with opened(server, via=via) as sock:
            sock.sendall(frame)
            assert closed_by_server(sock)
    serves(server)


def test_fuzzed_requests_get_statuses_and_the_server_goes_on(server: TensorwireServer) -> None:
    rng = random.Random(330)
    valid = infer_body()
    with opened(server) as sock:
        for _ in range(200):
            body = bytearray(valid)
            for _ in range(rng.randint(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            if rng.random() < 0.3:
                body = bytearray(rng.randbytes(rng.randint(0, 300)))
            code, message = call(sock, bytes(body))
            assert code_of(code)[0] in (0, 3, 5, 9, 11)  # OK or the request's fault
            assert "internal" not in message.lower()
    serves(server)


@pytest.mark.parametrize("via", PATHS)
def test_a_large_bodys_head_alone_holds_no_buffer(server: TensorwireServer, via: str) -> None:
    """A body is read into a buffer of its own only once a quarter of it came: a head
    that declares 8 MiB and stalls holds what was sent, not 8 MiB."""
    assert server.lane is not None
    size = server.lane.max_request_bytes
    with opened(server, via=via) as sock:
        held = set(server.lane.connections)
        sock.sendall(lane.REQUEST.pack(b"TWQ1", 3, 5.0, len(INFER), 0, size) + INFER.encode())
        sock.sendall(bytes(4096))
        time.sleep(0.2)
        bodies = [c._body for c in held if c._pending is not None]
        assert bodies == [None]  # parsed, waiting, nothing allocated
        sock.sendall(bytes(size // 4))
        time.sleep(0.2)
        bodies = [c._body for c in held if c._pending is not None]
        assert len(bodies) == 1 and bodies[0] is not None and len(bodies[0]) == size
        (ours,) = [c for c in held if c._pending is not None]
    # Its client killed mid-body: the connection goes, and its buffer with it.
    deadline = time.monotonic() + TIMEOUT
    while not ours.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ours.lost and ours._body is None and ours not in server.lane.connections
    serves(server)


@pytest.mark.parametrize("via", PATHS)
def test_slow_and_idle_connections_are_bounded(server: TensorwireServer, via: str) -> None:
    assert server.lane is not None
    held = [connect(server, via) for _ in range(40)]  # no grant: anonymous, evicted first
    held += [opened(server, via=via) for _ in range(30)]  # granted, idle
    time.sleep(0.2)
    assert len(server.lane.connections) <= 24  # fast_lane_connections
    serves(server)  # an honest client still gets in (the idlest go)
    with connect(server, via) as slow:  # the opening, then nothing: closed by HELLO_SECONDS
        began = time.monotonic()
        assert closed_by_server(slow)
        assert time.monotonic() - began < server_lane.HELLO_SECONDS + 5
    half = opened(server, via=via)
    half.sendall(lane.REQUEST.pack(b"TWQ1", 9, 1.0, len(INFER), 0, 1000) + INFER.encode())
    serves(server)  # half a frame holds nothing but its own connection
    for sock in [*held, half]:
        sock.close()


def test_the_lane_speaks_tls_when_grpc_does(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with served(engine, tls_cert=str(cert_file), tls_key=str(key_file)) as secured:
        assert secured.dataport is not None and secured.lane is not None
        with socket.create_connection(("127.0.0.1", secured.dataport.port)) as raw:
            raw.sendall(OPENING + HELLO.pack(HELLO_MAGIC, bytes(16)))  # plain text: refused
            assert closed_by_server(raw)
        roots = ca.cert_pem.bytes()
        with tw.Client(
            address(secured), timeout=TIMEOUT, fast_lane=True, root_certificates=roots
        ) as c:
            np.testing.assert_array_equal(c.infer("identity", SMALL)["output"], SMALL)
            np.testing.assert_array_equal(c.infer("identity", SMALL)["output"], SMALL)
        assert secured.lane.answered == 2


def test_a_client_that_never_reads_holds_bounded_server_memory(server: TensorwireServer) -> None:
    # Pings (each answered by a pong) sent and never read: past the transport's
    # high-water mark the server stops reading the connection, so the client's sends
    # block, rather than buffering its unread answers without bound.
    assert server.lane is not None
    pings = lane.PING * 4096
    limit = 64 << 20
    with opened(server) as sock:
        sock.settimeout(1.0)
        sent = 0
        while sent < limit:
            try:
                sent += sock.send(pings)
            except TimeoutError:  # blocked: stopped for good, or only slow to read?
                if any(getattr(c, "writing_paused", False) for c in server.lane.connections):
                    break
        assert sent < limit
        (held,) = [c for c in server.lane.connections if c.writing_paused]
        assert held.transport is not None
        assert held.transport.get_write_buffer_size() <= 1 << 20
        assert len(held.buffer) <= 1 << 20
        serves(server)  # the others are served meanwhile
    serves(server)


def test_calls_in_flight_are_bounded_whatever_one_read_holds(
    server: TensorwireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thousand requests in one write: one read buffers hundreds of them, yet no more
    # than MAX_IN_FLIGHT run at once, and no turn of the loop (a read, a resumption)
    # starts more than TURN_CALLS, though most are answered within their first step:
    # the rest wait in the buffer, other connections are served between turns, and
    # all are answered.
    most = 0
    started = 0  # in the loop's callback running now
    most_in_turn = 0
    start = server_lane.LaneConnection._start
    updated = server_lane.LaneConnection.buffer_updated
    resume = server_lane.LaneConnection._resume

    def counted(self: server_lane.LaneConnection, *args: object) -> None:
        nonlocal most, started, most_in_turn
        start(self, *args)  # type: ignore[arg-type]
        most = max(most, len(self.calls))
        started += 1
        most_in_turn = max(most_in_turn, started)

    def turn(run: Callable[..., None]) -> Callable[..., None]:
        def one(self: server_lane.LaneConnection, *args: object) -> None:
            nonlocal started
            started = 0
            run(self, *args)

        return one

    monkeypatch.setattr(server_lane.LaneConnection, "_start", counted)
    monkeypatch.setattr(server_lane.LaneConnection, "buffer_updated", turn(updated))
    monkeypatch.setattr(server_lane.LaneConnection, "_resume", turn(resume))
    body = infer_body()
    count = 1000
    frames = b"".join(
        b"".join(lane.request_frame(i, INFER, 20.0, b"", body)) for i in range(1, count + 1)
    )
    with opened(server) as sock:
        sender = threading.Thread(target=sock.sendall, args=(frames,))
        sender.start()
        answered: dict[int, int] = {}
        for _ in range(count):
            head = sock.recv(RESPONSE.size, socket.MSG_WAITALL)
            _, call_id, code, d, m, b = RESPONSE.unpack(head)
            if d + m + b:
                sock.recv(d + m + b, socket.MSG_WAITALL)
            answered[call_id] = code
        sender.join(TIMEOUT)
    assert sorted(answered) == list(range(1, count + 1))
    assert set(answered.values()) == {0}
    assert most <= server_lane.MAX_IN_FLIGHT  # (a call answered in its first step: 0)
    assert 1 <= most_in_turn <= server_lane.TURN_CALLS
    serves(server)


def test_a_connection_in_use_outlives_its_idle_time(
    server: TensorwireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle counts from its last call, not from its grant: calls more often than
    # IDLE_SECONDS keep the connection; once they stop, it is closed.
    monkeypatch.setattr(server_lane, "IDLE_SECONDS", 1.0)
    with opened(server) as sock:
        began = time.monotonic()
        while time.monotonic() - began < 3.5:
            code, _ = call(sock, infer_body())  # on the same connection all along
            assert code == 0
            time.sleep(0.1)
        assert closed_by_server(sock)


def test_a_stopping_server_sends_the_answers_it_wrote(engine) -> None:  # type: ignore[no-untyped-def]
    # A client slow to read a large answer when the server stops: the answer was
    # written (the call finished), so it is sent whole before the connection closes.
    from tensorwire import _messages

    running = TensorwireServer(Settings(port=0, device=str(engine.device)), engine)
    running.start()
    stopper = threading.Thread(target=running.stop, args=(5.0,))
    try:
        assert running.dataport is not None and running.lane is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # little in the kernel
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", running.dataport.port))
        sock.sendall(OPENING + HELLO.pack(HELLO_MAGIC, grant(running, "")))
        assert sock.recv(len(ACCEPTED), socket.MSG_WAITALL) == ACCEPTED
        big = np.ones((1, 3 << 19), np.float32)  # 6 MiB each way: more than the kernel holds
        body = _messages.infer_request("identity", {"input": big}, None, 0, False).finish()  # type: ignore[arg-type]
        sock.sendall(b"".join(lane.request_frame(5, INFER, 20.0, b"", body)))
        began = time.monotonic()
        while running.lane.answered < 1 and time.monotonic() - began < TIMEOUT:
            time.sleep(0.01)
        stopper.start()  # its answer is written, mostly not yet sent: stop now
        _, call_id, code, d, m, b = RESPONSE.unpack(sock.recv(RESPONSE.size, socket.MSG_WAITALL))
        assert (call_id, code) == (5, 0)
        rest = bytearray()
        while len(rest) < d + m + b:
            piece = sock.recv(1 << 16)
            if not piece:
                break
            rest += piece
        assert len(rest) == d + m + b > len(big.tobytes())
        sock.close()
    finally:
        if stopper.ident is None:
            running.stop(None)
        else:
            stopper.join(TIMEOUT)


def test_a_new_connection_may_present_its_grant_before_it_is_evicted(engine) -> None:  # type: ignore[no-untyped-def]
    # At the cap, a connection just made (no grant yet) is spared for FRESH_SECONDS:
    # the next newcomer evicts an idle granted one, as the data port's budget does.
    alice = "alice-token-0123456789abcdef"
    with served(engine, tokens=TOKENS, fast_lane_connections=3) as running:
        assert running.lane is not None
        lane_server = running.lane

        def ungranted() -> int:
            return sum(c.grant is None for c in list(lane_server.connections))

        def until(done: Callable[[], bool]) -> None:
            began = time.monotonic()
            while not done() and time.monotonic() - began < TIMEOUT:
                time.sleep(0.01)

        held = [opened(running) for _ in range(3)]  # the cap: granted, idle
        ticket = grant(running, alice)
        newcomer = connect(running)
        until(lambda: ungranted() == 1)
        crowd = connect(running)
        until(lambda: ungranted() == 2)
        newcomer.sendall(HELLO.pack(HELLO_MAGIC, ticket))
        assert newcomer.recv(len(ACCEPTED), socket.MSG_WAITALL) == ACCEPTED
        for sock in [*held, newcomer, crowd]:
            sock.close()
