"""Attacks on the same-host path, written as a hostile client on the server's host
would make them (issue 35: A, L, D, F, I): it keeps a writable mapping of every
segment it passes, can seal or size them as it likes, and can be killed at any time.
The server must keep serving, answer correctly or with a clear status, and never let
a kernel or a kept tensor see memory the client can still write."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import TOY_MODELS
from conftest import engine_server as serving
from conftest import server_address as address
from support.servers import TESTS, spawn_server

import tensorwire as tw
from tensorwire import _messages
from tensorwire._transport import same_host as client_same_host
from tensorwire._transport.dataport import ASK_DATA
from tensorwire.errors import DeadlineExceededError, TensorwireError, UnavailableError
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
#: Seconds each kernel is attacked for: the unfixed server died within a few calls.
ATTACK_SECONDS = 2.5
#: An index no tensor here has: any mix of its bytes with 0's is 0 or out of range.
FAR = 1 << 40
F_SEAL_FUTURE_WRITE = getattr(same_host.fcntl, "F_SEAL_FUTURE_WRITE", 0x10)


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(Settings(device="cpu", models=TOY_MODELS))


@pytest.fixture
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    yield from serving(engine)


class Tap:
    """The attacker's own writable mappings of every segment ``client`` takes from its
    pool (they outlive the client's: a hostile client never lets go)."""

    def __init__(self, client: tw.Client) -> None:
        link = client._transport._data.same_host
        assert link is not None
        self.pool = link.pool
        self.taken: list[tuple[int, mmap.mmap]] = []  # (segment size, mapping)
        self._lock = threading.Lock()
        take = self.pool.take

        def tapped(nbytes: int) -> client_same_host.Segment:
            segment = take(nbytes)
            with self._lock:
                if all(m is not segment for m in self._segments):
                    self._segments.append(segment)
                    self.taken.append((segment.size, mmap.mmap(segment.fd, segment.size)))
            return segment

        self._segments: list[client_same_host.Segment] = []
        self.pool.take = tapped  # type: ignore[method-assign]

    def mappings(self, size: int) -> list[mmap.mmap]:
        """The attacker's mappings of the segments of ``size`` bytes (page-rounded)."""
        rounded = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        with self._lock:
            return [m for s, m in self.taken if s == rounded]


class Flipper:
    """A thread that keeps flipping one int64 of every tapped segment of ``size``
    bytes between ``values`` while calls run."""

    def __init__(self, tap: Tap, size: int, position: int, values: tuple[int, int]) -> None:
        self.tap, self.size, self.position, self.values = tap, size, position, values
        self.stop = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flipper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            targets = [np.frombuffer(m, np.int64) for m in self.tap.mappings(self.size)]
            if not targets:
                time.sleep(0.001)
                continue
            for _ in range(2000):
                for value in self.values:
                    for target in targets:
                        target[self.position] = value
            self.flips += 1
            time.sleep(0)  # let the caller's thread in now and then


# ------------------------------------------------------------ A: the TOCTOU


@pytest.fixture(scope="module")
def victim() -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """A server process of its own: an attack that crashes it must not take pytest."""
    with spawn_server("--host", "127.0.0.1") as running:
        yield running


N = 1 << 20  # indices per request: 8 MiB of int64, streamed (same host)
ROWS = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)


def _bincount(index: np.ndarray) -> tuple[tuple[Any, ...], Callable[[Any], None]]:
    def check(out: Any) -> None:
        assert np.asarray(out).tolist() == [index.size], "bincount counted what it never saw"

    return (index,), check


def _index_select(index: np.ndarray) -> tuple[tuple[Any, ...], Callable[[Any], None]]:
    def check(out: Any) -> None:
        out = np.asarray(out)
        assert out.shape == (index.size, 8) and (out == ROWS[0]).all(), "rows never asked for"

    return (ROWS, 0, index), check


def _gather(index: np.ndarray) -> tuple[tuple[Any, ...], Callable[[Any], None]]:
    column = np.repeat(ROWS[:, :1], index.size // 4, axis=0)  # one column: any row's index

    def check(out: Any) -> None:
        assert (np.asarray(out) == 0).all(), "gathered values never asked for"

    return (column, 0, index.reshape(-1, 1)), check


def _nll_loss(index: np.ndarray) -> tuple[tuple[Any, ...], Callable[[Any], None]]:
    logp = np.full((index.size, 4), -1.0, np.float32)
    logp[:, 0] = -0.5

    def check(out: Any) -> None:
        assert float(np.asarray(out)) == pytest.approx(0.5), "a loss over classes never there"

    return (logp, index), check


def _nonzero(index: np.ndarray) -> tuple[tuple[Any, ...], Callable[[Any], None]]:
    def check(out: Any) -> None:  # counted, then written: either count is right
        assert np.asarray(out).tolist() in ([], [[index.size - 1]]), "a count it never saw"

    return (index,), check


#: What a kernel that read an index far out of range may answer.
CLEAR = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE")

KERNELS = {
    "bincount": _bincount,
    "index_select": _index_select,
    "gather": _gather,
    "nn.functional.nll_loss": _nll_loss,
    "nonzero": _nonzero,
}


@pytest.mark.parametrize("function", list(KERNELS))
def test_rewriting_an_input_mid_call_cannot_crash_or_fool_a_kernel(
    victim: tuple[subprocess.Popen[str], str, list[str]], function: str
) -> None:
    """Each kernel validates its indices (or sizes its output from them), then uses
    them. The client flips the last index between 0 and far out of range in its own
    mapping of the segment, from another thread, while the calls run. The server
    must answer each call for the indices it read (all 0: right; one far: a clear
    error), and stay up."""
    proc, where, log = victim
    index = np.zeros(N, np.int64)
    args, check = KERNELS[function](index)
    answered = refused = 0
    with tw.Client(where, timeout=TIMEOUT, stream_threshold=0, retries=0) as client:
        tap = Tap(client)
        with Flipper(tap, index.nbytes, N - 1, (FAR, 0)) as flipper:
            deadline = time.monotonic() + ATTACK_SECONDS
            while time.monotonic() < deadline or not flipper.flips:
                assert proc.poll() is None, f"the server died: {proc.returncode}\n" + "".join(
                    log[-20:]
                )
                try:
                    out = client.call(function, *args)
                except UnavailableError as exc:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)  # died, or only broke?
                    raise AssertionError(
                        f"the server broke (exit {proc.returncode}): {exc}"
                    ) from exc
                except TensorwireError as exc:
                    refused += 1  # it read an index far out of range: a clear status
                    assert exc.code in CLEAR, exc
                    continue
                check(out)
                answered += 1
        # Still serving, and right, once the attacker stops.
        index[:] = 0
        check(client.call(function, *args))
    assert proc.poll() is None, f"the server died: {proc.returncode}\n" + "".join(log[-20:])
    assert answered + refused >= 3 and flipper.flips, (answered, refused, flipper.flips)


# ------------------------------------------------------------ L: kept tensors


def test_a_kept_tensor_does_not_alias_the_clients_segment(server: TensorwireServer) -> None:
    """``put`` over the same-host path, then the client writes into its own mapping of
    the segment it passed: the tensor the server keeps must not change."""
    data = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    with tw.Client(address(server), timeout=TIMEOUT, stream_threshold=0) as client:
        tap = Tap(client)
        kept = client.put(data)
        (mapping,) = tap.mappings(data.nbytes)
        np.frombuffer(mapping, np.float32)[:] = 42
        np.testing.assert_array_equal(client.get(kept), data)
        # Nor do the client's later calls, which reuse the segment.
        client.infer("identity", data + 1)
        np.testing.assert_array_equal(client.get(kept), data)
    assert server.dataport is not None and server.dataport.moved["shared_memory"][0] >= 3


# ------------------------------------------------------------ by hand


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


def rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


PAYLOAD = np.arange(3 << 18, dtype=np.float32)  # 3 MiB
SPARSE = 4 << 30


# ------------------------------------------------------------ D: sparse segments


def test_a_sparse_4_gib_segment_costs_no_more_than_its_payload(server: TensorwireServer) -> None:
    """A 3 MiB request whose input and output memfds are 4 GiB sparse files (the
    output's payload already written, so that the server writes it in place): the
    server touches the payloads' bytes and nothing else of them."""
    before = rss()
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
        grown = rss() - before
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


# ------------------------------------------------------------ F: killed clients

DYING = """
import os, signal, sys, time
import numpy as np
import tensorwire as tw
from tensorwire._transport import same_host

def inodes():
    with open("/proc/self/maps") as maps:
        return " ".join({line.split()[4] for line in maps if "memfd:tensorwire" in line})

receive = same_host.LocalCarrier.receive
calls = []

def receiving(self, receiver, timeout):
    calls.append(1)
    if len(calls) == 4 and sys.argv[2] == "awaiting-outputs":
        print(inodes(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # before passing the output segments
    return receive(self, receiver, timeout)

same_host.LocalCarrier.receive = receiving
big = np.arange(3 << 20, dtype=np.float32)
with tw.Client(sys.argv[1], stream_threshold=0, retries=0) as client:
    for _ in range(4):
        client.infer("identity", big)  # reusing its segments: the server keeps windows
    print(inodes(), flush=True)
    time.sleep(60)
"""


def _memfd_inodes() -> set[str]:
    """The inodes of the memfds this process (the server's) maps."""
    with open("/proc/self/maps") as maps:
        return {line.split()[4] for line in maps if "memfd:" in line}


@pytest.mark.parametrize("when", ["between-calls", "awaiting-outputs"])
def test_a_killed_clients_segments_are_unmapped_at_once(
    server: TensorwireServer, when: str
) -> None:
    """A client that made calls back to back (the server keeps windows on its output
    segments) is SIGKILLed, idle or while the server waits for its output segments:
    the server maps none of its memfds shortly after, with the garbage collector off
    (nothing may wait for it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DYING, address(server), when],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        text=True,
    )
    gc.disable()
    try:
        assert proc.stdout is not None
        theirs = set(proc.stdout.readline().split())
        assert theirs, "the client died before its calls"
        if when == "between-calls":
            assert _memfd_inodes() & theirs, "the server kept no window: nothing to prove"
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while _memfd_inodes() & theirs and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _memfd_inodes() & theirs
        assert not left, f"the server still maps {len(left)} of a dead client's segments"
    finally:
        gc.enable()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        np.testing.assert_array_equal(client.infer("identity", PAYLOAD)["output"], PAYLOAD)


# ------------------------------------------------------------ I: deadlines


def test_a_deadline_passing_on_the_same_host_connection_is_deadline_exceeded(
    server: TensorwireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The response's payloads are slow to be written (a loaded host, say) and the
    call's deadline passes while the client waits on the connection: that is
    DeadlineExceeded, not a broken connection to retry."""
    write = same_host.write_outputs

    def slow(*args: Any) -> int:
        time.sleep(1.5)
        return write(*args)

    monkeypatch.setattr(same_host, "write_outputs", slow)
    with tw.Client(address(server), stream_threshold=0, retries=0) as client:
        for _ in range(3):
            with pytest.raises(DeadlineExceededError):
                client.infer("identity", PAYLOAD, timeout=0.75)
        monkeypatch.setattr(same_host, "write_outputs", write)
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
