"""Same-host transfers: a client on the server's host passes shared memory (sealed
memfds, over the data port's abstract Unix socket) instead of sending bytes; results
land in segments the client owns; nothing is left behind, whatever ends the call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pytest
from conftest import TOY_MODELS
from conftest import engine_server as serving
from conftest import server_address as address
from support.arrays import sample
from support.servers import TESTS

import tensorwire as tw
from tensorwire import _messages
from tensorwire._transport.dataport import ASK_DATA
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.dataport import MAX_SEGMENTS, REQUEST, SHARED_MAGIC
from tensorwire.wire.dtypes import NUMPY_BY_WIRE
from tensorwire_server.dataport import same_host
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.skipif(not same_host.SUPPORTED, reason="same-host transfers: Linux")

TIMEOUT = 60
BIG = np.arange(3 << 20, dtype=np.float32).reshape(3, -1)  # 12 MiB: streamed


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(Settings(device="cpu", models=TOY_MODELS))


@pytest.fixture
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    yield from serving(engine)


def moved(server: TensorwireServer, path: str = "shared_memory") -> int:
    """Transfers completed over ``path``."""
    assert server.dataport is not None
    return server.dataport.moved[path][0]


class Segments(NamedTuple):
    """The tensorwire segments a process maps and holds descriptors of, by inode."""

    mapped: frozenset[int]
    held: frozenset[int]

    def since(self, before: Segments) -> Segments:
        """Those that were not there at ``before``: segments of earlier tests' clients
        freed meanwhile do not count, nor do those still alive."""
        return Segments(self.mapped - before.mapped, self.held - before.held)

    @property
    def none(self) -> bool:
        return not self.mapped and not self.held


def memfds(pid: int | str = "self") -> Segments:
    """The tensorwire segments process ``pid`` maps and holds descriptors of (after
    collecting what earlier tests left as garbage: segments of clients gone)."""
    gc.collect()
    with open(f"/proc/{pid}/maps") as maps:
        mapped = frozenset(int(line.split()[4]) for line in maps if "memfd:tensorwire" in line)
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if "memfd:tensorwire" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                held.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return Segments(mapped, frozenset(held))


def settles(condition: Callable[[], bool], seconds: float = 15) -> bool:
    """Whether ``condition`` holds within ``seconds`` (threads finish their work)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gc.collect()
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ------------------------------------------------------------ the path itself


def test_a_client_on_the_servers_host_passes_shared_memory(server: TensorwireServer) -> None:
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        out = client.infer("identity", BIG)["output"]
        np.testing.assert_array_equal(out, BIG)
        assert out.flags.writeable and out.flags.c_contiguous
        assert moved(server) == 1 and moved(server, "tcp") == 0
        out[0, 0] = -1  # the caller's own: the next call is not disturbed
        again = client.infer("identity", BIG)["output"]
        np.testing.assert_array_equal(again, BIG)
        assert moved(server) == 2


def test_every_dtype_matches_the_network_path(server: TensorwireServer) -> None:
    inputs = {
        f"t{i}": sample(np.dtype(dtype), (i % 3, 1000 + i))
        for i, dtype in enumerate(NUMPY_BY_WIRE.values())
    }
    inputs["big"] = np.random.default_rng(0).standard_normal((1 << 18,))
    with tw.Client(address(server), timeout=TIMEOUT, stream_threshold=0) as local:
        near = local.infer("echo", inputs)
    with tw.Client(address(server), timeout=TIMEOUT, stream_threshold=0, same_host=False) as far:
        network = far.infer("echo", inputs)
    assert moved(server) == 1 and moved(server, "tcp") == 1
    assert list(near) == list(network) == list(inputs)
    for name, arr in inputs.items():
        assert near[name].dtype == network[name].dtype == arr.dtype, name
        assert near[name].tobytes() == network[name].tobytes() == arr.tobytes(), name


def test_the_async_client_passes_shared_memory_too(server: TensorwireServer) -> None:
    async def main() -> list[np.ndarray]:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT) as client:
            calls = [client.infer("identity", BIG * k) for k in range(3)]
            return [out["output"] for out in await asyncio.gather(*calls)]

    for k, out in enumerate(asyncio.run(main())):
        np.testing.assert_array_equal(out, BIG * k)
    assert moved(server) == 3


def test_threads_sharing_a_client_each_get_their_own_results(server: TensorwireServer) -> None:
    """Concurrent calls take segments and connections of their own from the pools."""
    failures: list[BaseException] = []
    with tw.Client(address(server), timeout=TIMEOUT) as client:

        def calls(k: int) -> None:
            try:
                for i in range(5):
                    sent = BIG[:, : (k + 1) << 18] * (k * 10 + i)  # sizes differ by thread
                    np.testing.assert_array_equal(client.infer("identity", sent)["output"], sent)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=calls, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    assert not failures, failures
    assert moved(server) == 30


def test_a_response_of_more_segments_than_one_message_carries(server: TensorwireServer) -> None:
    rows = np.random.default_rng(2).standard_normal((MAX_SEGMENTS + 47, 4096))  # 9.7 MiB
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        out = client.infer("rows", rows)
    assert len(out) == len(rows) and moved(server) == 1
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(out[f"row{i}"], row)


def test_segments_are_reused_and_none_outlives_the_client(server: TensorwireServer) -> None:
    before = memfds()
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        for _ in range(2):
            client.infer("identity", BIG)
        pooled = memfds().since(before)
        for _ in range(5):
            client.infer("identity", BIG)
        assert memfds().since(before) == pooled  # the same segments, again and again
        kept = client.infer("identity", BIG)["output"]
    np.testing.assert_array_equal(kept, BIG)  # a result outlives its client
    del kept
    assert settles(lambda: memfds().since(before).none), memfds().since(before)


def test_a_tensor_the_server_keeps_is_never_overwritten(server: TensorwireServer) -> None:
    """``put`` stores a streamed request's own buffer as it is: the server's copy of
    the client's input segment, so the client reusing that segment for the next calls
    changes nothing of it."""
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        held = client.put(BIG)
        for k in range(3):
            client.infer("identity", BIG + k + 1)
        np.testing.assert_array_equal(held.numpy(), BIG)
        assert moved(server) == 5  # put, three calls, and numpy


def test_without_the_servers_socket_the_data_port_takes_the_ticket(
    server: TensorwireServer,
) -> None:
    plane = server.dataport
    assert plane is not None and plane.local_name is not None
    # As from another host or network namespace: nothing answers to the name.
    plane.local_name = f"tensorwire-data-{os.urandom(16).hex()}"
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert (
            client._transport._data.same_host is not None
            and client._transport._data.same_host.detours.avoided()
        )
    assert moved(server) == 0 and moved(server, "tcp") == 1


def test_a_unix_socket_target_passes_shared_memory(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server may also listen on a Unix socket; a client there is on its host."""
    path = tmp_path / "tw.sock"
    for server in serving(engine, unix_socket=str(path)):
        assert os.stat(path).st_mode & 0o777 == 0o660  # the server's user and group
        with tw.Client(f"unix:{path}", timeout=TIMEOUT) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
            small = np.ones((1, 16), np.float32)
            np.testing.assert_array_equal(client.infer("identity", small)["output"], small)
        assert moved(server) == 1 and moved(server, "tcp") == 0
        # Without same-host transfers there is no data port to try: chunks in gRPC.
        with tw.Client(f"unix:{path}", timeout=TIMEOUT, same_host=False) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert moved(server) == 1 and moved(server, "tcp") == 0


def test_either_side_can_turn_it_off(engine) -> None:  # type: ignore[no-untyped-def]
    for plain in serving(engine, same_host=False):
        assert plain.dataport is not None and plain.dataport.local_name is None
        with tw.Client(address(plain), timeout=TIMEOUT) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert moved(plain) == 0 and moved(plain, "tcp") == 1
    for server in serving(engine):
        with tw.Client(address(server), timeout=TIMEOUT, same_host=False) as client:
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert moved(server) == 0 and moved(server, "tcp") == 1


def test_metrics_count_the_shared_memory_path(server: TensorwireServer) -> None:
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        client.infer("identity", BIG)
    registry = server.metrics.registry
    labels = {"path": "shared_memory"}
    assert registry.get_sample_value("tensorwire_data_plane_transfers_total", labels) == 1
    assert registry.get_sample_value("tensorwire_data_plane_bytes_total", labels) == 2 * BIG.nbytes


# ------------------------------------------------------------ whatever ends the call


def test_a_cancelled_call_leaves_no_segment_behind(server: TensorwireServer) -> None:
    before = memfds()

    async def main() -> None:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, stream_threshold=0) as c:
            call = asyncio.ensure_future(c.infer("sleeper", np.float64(5.0)))
            assert await asyncio.to_thread(settles, lambda: bool(memfds().since(before).mapped), 10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # The client and its server go on.
            np.testing.assert_array_equal((await c.infer("identity", BIG))["output"], BIG)

    asyncio.run(main())
    assert settles(lambda: memfds().since(before).none), memfds().since(before)


KILLED = """
import sys
import numpy as np
import tensorwire as tw

with tw.Client(sys.argv[1], stream_threshold=0, retries=0) as client:
    client.infer("sleeper", np.float64(3.0))
"""


def test_a_killed_client_leaves_no_segment_behind(server: TensorwireServer) -> None:
    before = memfds()
    plane = server.dataport
    assert plane is not None
    proc = subprocess.Popen([sys.executable, "-c", KILLED, address(server)], cwd=TESTS)
    try:
        # The model sleeps on the server's copy of the killed client's input.
        assert settles(lambda: moved(server) == 0 and bool(len(plane.budgets["shared_memory"])), 30)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # The server held none of its segments: read, then closed at once.
    assert settles(lambda: memfds().since(before).none, 45), memfds().since(before)
    assert not [name for name in os.listdir("/dev/shm") if "tensorwire" in name]
    with tw.Client(address(server), timeout=TIMEOUT) as client:
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)


# ------------------------------------------------------------ segments, by hand


class Asking:
    """An InferStream call that asks for the data port, driven by hand, whose
    ticket is presented on the same-host socket with descriptors of our choosing."""

    def __init__(self, server: TensorwireServer, array: np.ndarray) -> None:
        encoder = _messages.infer_request("identity", array, None, 0, False)
        self.header = next(streaming.parts(encoder))
        self.done = threading.Event()
        self.channel = grpc.insecure_channel(address(server))
        method = self.channel.stream_stream("/tensorwire.v1.TensorService/InferStream")
        self.responses = method(self.requests(), timeout=TIMEOUT)
        number, body = framing.split_part(next(self.responses))
        assert number == framing.PART_DATA
        self.ticket = pb.DataTransfer.FromString(bytes(body))
        assert self.ticket.local_socket

    def requests(self) -> Iterator[bytes]:
        yield self.header
        yield ASK_DATA
        self.done.wait(TIMEOUT)

    def present(self, fds: list[int]) -> bytes:
        """Present the ticket with ``fds``; what the server answered (b"": it closed)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect("\0" + self.ticket.local_socket)
            socket.send_fds(sock, [REQUEST.pack(SHARED_MAGIC, self.ticket.ticket)], fds)
            return sock.recv(16)

    def status(self) -> tuple[grpc.StatusCode, str]:
        self.done.set()
        with pytest.raises(grpc.RpcError) as failed:
            list(self.responses)
        self.channel.close()
        return failed.value.code(), failed.value.details()


def memfd(size: int, seals: int = same_host.fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        same_host.fcntl.fcntl(fd, same_host.fcntl.F_ADD_SEALS, seals)
    return fd


def unsealed(size: int) -> int:
    return memfd(size, 0)


def a_file(size: int) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    ("make", "count", "wanted"),
    [
        (unsealed, 1, "F_SEAL_SHRINK"),
        (a_file, 1, "not a memfd"),
        (lambda size: memfd(size - 1), 1, "too small"),
        (memfd, 2, "2 segments for a request of 1 payloads"),
        (memfd, 0, "0 segments"),
    ],
    ids=["unsealed", "a-file", "too-small", "too-many", "none"],
)
def test_an_unacceptable_segment_gets_a_clear_status(
    server: TensorwireServer, make: Callable[[int], int], count: int, wanted: str
) -> None:
    before = memfds()
    asking = Asking(server, BIG)
    fds = [make(BIG.nbytes) for _ in range(count)]
    try:
        assert asking.present(fds) == b""  # refused: the connection closes
        code, details = asking.status()
    finally:
        for fd in fds:
            os.close(fd)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and wanted in details, details
    with tw.Client(address(server), timeout=TIMEOUT) as client:  # and it serves on
        np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
    assert settles(lambda: memfds().since(before).none)


def test_a_ticket_presented_twice_maps_nothing_the_second_time(server: TensorwireServer) -> None:
    asking = Asking(server, BIG)
    first, second = memfd(BIG.nbytes), memfd(BIG.nbytes)
    try:
        assert asking.present([first]) == b"TWOK"  # the server copies it ...
        assert asking.present([second]) == b""  # ... and drops the replay unread
    finally:
        os.close(first)
        os.close(second)
        asking.status()  # the first connection closed: the call fails, as it should
