"""Attacks on the same-host path with segments of the attacker's own making, passed by
hand on the same-host socket (issue 35: D, I): sparse files far larger than their
payload, inputs and outputs sealed against writing, and segments rewritten once the
server has read them. The server must touch a payload's bytes and nothing else, refuse
what it cannot write with a clear status, and keep no mapping of a client's memory.
The attacks through a client's own segments are in test_attack_same_host.py."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TOY_MODELS
from conftest import engine_server as serving
from conftest import server_address as address
from support.raw_streams import rss

import tensorwire as tw
from tensorwire import _messages
from tensorwire._transport.dataport import ASK_DATA
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.dataport import (
    ACCEPTED,
    OUTPUTS_MAGIC,
    REQUEST,
    RESPONSE,
    RESPONSE_MAGIC,
    SHARED_MAGIC,
)
from tensorwire.wire.streaming import StreamReceiver
from tensorwire_server.dataport import same_host
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.skipif(not same_host.SUPPORTED, reason="same-host transfers: Linux")

TIMEOUT = 60
F_SEAL_FUTURE_WRITE = getattr(same_host.fcntl, "F_SEAL_FUTURE_WRITE", 0x10)


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(Settings(device="cpu", models=TOY_MODELS))


@pytest.fixture
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    yield from serving(engine)


# ------------------------------------------------------------ segments by hand


class Raw:
    """One InferStream call of ``identity`` driven by hand on the same-host socket,
    with segments of the attacker's making."""

    def __init__(self, server: TensorwireServer, array: np.ndarray, timeout: float = TIMEOUT):
        encoder = _messages.infer_request("identity", array, None, 0, False)
        self.header = next(streaming.parts(encoder))
        self.done = threading.Event()
        self.channel = grpc.insecure_channel(address(server))
        method = self.channel.stream_stream("/tensorwire.v1.TensorService/InferStream")
        self.responses = method(self.requests(), timeout=timeout)
        number, body = framing.split_part(next(self.responses))
        assert number == framing.PART_DATA
        self.ticket = pb.DataTransfer.FromString(bytes(body))
        assert self.ticket.local_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect("\0" + self.ticket.local_socket)

    def requests(self) -> Iterator[bytes]:
        yield self.header
        yield ASK_DATA
        self.done.wait(TIMEOUT)

    def present(self, fds: list[int]) -> bytes:
        socket.send_fds(self.sock, [REQUEST.pack(SHARED_MAGIC, self.ticket.ticket)], fds)
        return self.sock.recv(16)

    def response(self, fds: list[int]) -> bytes:
        """Take the response's header, pass ``fds`` for its payloads; the server's
        answer (b"": it closed)."""
        self.done.set()  # the request stream ends: the server computes
        receiver = StreamReceiver(pb.InferResponse)
        number, body = framing.split_part(next(self.responses))
        receiver.take(number, body)
        number, _ = framing.split_part(next(self.responses))  # the announcement
        assert number == framing.PART_DATA
        socket.send_fds(self.sock, [OUTPUTS_MAGIC], fds)
        return self.sock.recv(64)

    def status(self) -> tuple[grpc.StatusCode, str]:
        self.done.set()
        code, details = grpc.StatusCode.OK, ""
        try:
            list(self.responses)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        self.channel.close()
        self.sock.close()
        return code, details


def memfd(size: int, data: bytes = b"", seals: int = 0) -> int:
    """A memfd of ``size`` bytes holding ``data`` first, sealed against shrinking and
    growing and with ``seals``."""
    fd = os.memfd_create("attacker", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    fcntl = same_host.fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | seals)
    return fd


PAYLOAD = np.arange(3 << 18, dtype=np.float32)  # 3 MiB
SPARSE = 4 << 30


# ------------------------------------------------------------ D: sparse segments


def test_a_sparse_4_gib_segment_costs_no_more_than_its_payload(server: TensorwireServer) -> None:
    """A 3 MiB request whose input and output memfds are 4 GiB sparse files (the
    output's payload already written, so that the server writes it in place): the
    server touches the payloads' bytes and nothing else of them."""
    before = rss(os.getpid())
    source = memfd(SPARSE, PAYLOAD.tobytes())
    target = memfd(SPARSE, bytes(PAYLOAD.nbytes))
    try:
        for _ in range(2):  # twice: the second reuses what the first mapped
            raw = Raw(server, PAYLOAD)
            assert raw.present([source]) == ACCEPTED
            reply = raw.response([target])
            assert reply[:4] == RESPONSE_MAGIC and len(reply) == RESPONSE.size + 1, reply
            assert raw.status()[0] is grpc.StatusCode.OK
            got = np.frombuffer(os.pread(target, PAYLOAD.nbytes, 0), np.float32)
            np.testing.assert_array_equal(got, PAYLOAD)
            os.pwrite(target, bytes(PAYLOAD.nbytes), 0)
        # Pages the server made exist: neither file grew beyond its payload.
        for fd in (source, target):
            assert os.fstat(fd).st_blocks * 512 < 64 << 20, os.fstat(fd).st_blocks
        grown = rss(os.getpid()) - before
        assert grown < 1 << 30, f"RSS grew by {grown >> 20} MiB for a 3 MiB request"
    finally:
        os.close(source)
        os.close(target)


# ------------------------------------------------------------ I: seals


def test_an_input_sealed_against_writes_is_simply_read(server: TensorwireServer) -> None:
    """An immutable input is what the server wants most: it reads it as any other."""
    source = memfd(PAYLOAD.nbytes, PAYLOAD.tobytes(), same_host.fcntl.F_SEAL_WRITE)
    target = memfd(PAYLOAD.nbytes)
    try:
        raw = Raw(server, PAYLOAD)
        assert raw.present([source]) == ACCEPTED
        assert raw.response([target])[:4] == RESPONSE_MAGIC
        assert raw.status()[0] is grpc.StatusCode.OK
        got = np.frombuffer(os.pread(target, PAYLOAD.nbytes, 0), np.float32)
        np.testing.assert_array_equal(got, PAYLOAD)
    finally:
        os.close(source)
        os.close(target)


@pytest.mark.parametrize(
    ("seal", "written"),
    [
        (same_host.fcntl.F_SEAL_WRITE, False),
        (same_host.fcntl.F_SEAL_WRITE, True),  # as a reused segment: a window, not pwritev
        (F_SEAL_FUTURE_WRITE, True),
    ],
    ids=["write-fresh", "write-reused", "future-write"],
)
def test_an_output_sealed_against_writes_is_invalid_argument(
    server: TensorwireServer, seal: int, written: bool
) -> None:
    source = memfd(PAYLOAD.nbytes, PAYLOAD.tobytes())
    target = memfd(PAYLOAD.nbytes, bytes(PAYLOAD.nbytes) if written else b"", seal)
    try:
        raw = Raw(server, PAYLOAD)
        assert raw.present([source]) == ACCEPTED
        assert raw.response([target]) == b""  # refused: the connection closes
        code, details = raw.status()
    finally:
        os.close(source)
        os.close(target)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "output segment 0" in details and "sealed against writing" in details, details
    with tw.Client(address(server), timeout=TIMEOUT, stream_threshold=0) as client:
        np.testing.assert_array_equal(client.infer("identity", PAYLOAD)["output"], PAYLOAD)


# ------------------------------------------------------------ staging (GPU servers)


@pytest.mark.parametrize("in_place", [True, False], ids=["cpu", "staged"])
def test_both_placements_copy_the_segments_and_keep_no_mapping(in_place: bool) -> None:
    """On the CPU the server's copies replace the request's buffers; staged for a GPU
    (``in_place`` False) the segments are read straight into the staging buffers, a
    few MiB at a time. Either way the request's bytes are the server's own: nothing
    maps a segment, and rewriting it afterwards changes nothing."""
    from tensorwire_server.dataport import listener
    from tensorwire_server.regions.copies import Copies

    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB: more than one staging read
    small = np.arange(10, dtype=np.int64)
    receiver = StreamReceiver(pb.InferRequest)
    encoder = _messages.infer_request("identity", {"big": big, "small": small}, None, 0, False)
    receiver.feed(next(streaming.parts(encoder)))
    fds = [memfd(big.nbytes, big.tobytes()), memfd(small.nbytes + 100, small.tobytes())]
    try:
        transfer = type("Transfer", (), {"receiver": receiver, "in_place": in_place})()
        listener._place(transfer, fds, Copies())  # type: ignore[arg-type]
        with open("/proc/self/maps") as maps:
            assert "memfd:attacker" not in maps.read()
        for fd in fds:
            os.pwrite(fd, b"\xff" * 64, 0)
    finally:
        for fd in fds:
            os.close(fd)
    received = receiver.finish()
    (got_big, got_small) = [
        np.asarray(received.array(nt.tensor, nt.name)) for nt in received.message.inputs
    ]
    np.testing.assert_array_equal(got_big, big)
    np.testing.assert_array_equal(got_small, small)
