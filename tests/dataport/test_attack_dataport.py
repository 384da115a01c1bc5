"""Attacks on the data port's connections (issue 35, E and F): anyone who reaches the
data port or the same-host socket can open connections without a ticket; they must
not lock out ticket holders, ordinary crowds must not either, a refused connection
sends chunks through gRPC at once, and a client killed mid-download leaves nothing
behind in the server, without waiting for a garbage collection."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import engine_server, on_device
from conftest import server_address as address

import tensorwire as tw
from tensorwire import _messages
from tensorwire._transport.dataport import ASK_DATA
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.dataport import ACCEPTED, REQUEST, REQUEST_MAGIC, recv_exact
from tensorwire_server.dataport import same_host
from tensorwire_server.dataport.budgets import Budget
from tensorwire_server.eviction import FRESH_SECONDS
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

#: Generous: a call that waited for a ticket's 10 s would still pass; none should.
TIMEOUT = 20
BIG = np.arange(3 << 20, dtype=np.float32).reshape(3, -1)  # 12 MiB: streamed
TOKENS = "alice * alice-token-0123456789abcdef;bob * bob-token-0123456789abcdef0"
same_host_only = pytest.mark.skipif(not same_host.SUPPORTED, reason="same-host: Linux")


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(on_device(Settings(device="cpu")))


#: A CPU server around the module's engine, as a context manager.
served = contextlib.contextmanager(engine_server)


def moved(server: TensorwireServer, path: str) -> int:
    """Transfers completed over ``path`` ("tcp", "shared_memory")."""
    assert server.dataport is not None
    return server.dataport.moved[path][0]


@contextlib.contextmanager
def flood(family: socket.AddressFamily, where: object, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that present nothing, open while the block runs."""
    kind = socket.SOCK_SEQPACKET if family == socket.AF_UNIX else socket.SOCK_STREAM
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind)
            socks.append(sock)
            sock.connect(where)  # blocking: a full backlog waits for the server to accept
            sock.settimeout(TIMEOUT)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


# ------------------------------------------------------------ E: floods, crowds


@same_host_only
def test_an_idle_flood_does_not_lock_out_ticket_holders(engine) -> None:  # type: ignore[no-untyped-def]
    """200 anonymous connections on each listener, twice the budget: clients with
    tickets still get in (on the data port, not by falling back), the oldest
    anonymous connections making room."""
    with served(engine, data_plane_connections=100, data_plane_transfers=32) as server:
        plane = server.dataport
        assert plane is not None and plane.local_name is not None
        tcp = flood(socket.AF_INET, ("127.0.0.1", plane.port), 200)
        local = flood(socket.AF_UNIX, "\0" + plane.local_name, 200)
        with tcp as tcp_socks, local as local_socks:
            with tw.Client(address(server), timeout=TIMEOUT) as near:
                np.testing.assert_array_equal(near.infer("identity", BIG)["output"], BIG)
            with tw.Client(address(server), timeout=TIMEOUT, same_host=False) as far:
                np.testing.assert_array_equal(far.infer("identity", BIG + 1)["output"], BIG + 1)
            assert moved(server, "shared_memory") == 1 and moved(server, "tcp") == 1
            # The budgets held: the flood's oldest were cut to make room.
            assert len(plane.budgets["tcp"]) <= 100 and len(plane.budgets["shared_memory"]) <= 100
            assert sum(map(closed_by_server, tcp_socks[:50])) == 50
            assert sum(map(closed_by_server, local_socks[:50])) == 50


def test_a_tls_handshake_that_never_ends_is_evicted_too(engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Anonymous TLS connections (stuck before or in the handshake) make room as well."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = {"tls_cert": str(cert_file), "tls_key": str(key_file), "same_host": False}
    with served(engine, data_plane_connections=16, data_plane_transfers=8, **tls) as server:
        plane = server.dataport
        assert plane is not None
        with flood(socket.AF_INET, ("127.0.0.1", plane.port), 40) as socks:
            for sock in socks[-16:]:
                sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, no more
            with tw.Client(
                address(server), timeout=TIMEOUT, root_certificates=str(ca_file)
            ) as client:
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
            assert moved(server, "tcp") == 1


def test_many_ordinary_clients_all_succeed(engine) -> None:  # type: ignore[no-untyped-def]
    """More clients times threads than the budget holds connections (each client pools
    its own), two tokens each capped below the server's transfers: every call
    succeeds, on the data port or through gRPC."""
    settings = {
        "data_plane_connections": 12,
        "data_plane_transfers": 8,
        "data_plane_transfers_per_caller": 3,
        "tokens": TOKENS,
    }
    with served(engine, **settings) as server:
        tokens = [line.split()[2] for line in TOKENS.split(";")]
        clients = [
            tw.Client(
                address(server),
                timeout=TIMEOUT,
                token=tokens[k % 2],
                same_host=k % 3 != 0,
                stream_threshold=1 << 20,
            )
            for k in range(5)
        ]
        data = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: streamed

        def calls(k: int) -> int:
            client = clients[k % len(clients)]
            for j in range(3):
                got = client.infer("identity", data + k + j)["output"]
                np.testing.assert_array_equal(got, data + k + j)
            return k

        try:
            with ThreadPoolExecutor(5 * 5) as pool:
                assert sorted(pool.map(calls, range(5 * 5))) == list(range(5 * 5))
        finally:
            for client in clients:
                client.close()
        plane = server.dataport
        assert plane is not None
        assert moved(server, "tcp") + moved(server, "shared_memory") > 0
        assert settles(lambda: plane.slots.held() == 0)  # every slot given back


def test_a_caller_past_its_transfers_sends_chunks_at_once(engine) -> None:  # type: ignore[no-untyped-def]
    """One token holding its transfers (tickets claimed, payloads stalled): its next
    call gets no ticket and sends chunks; another token still gets the data port."""
    settings = {"data_plane_transfers_per_caller": 1, "tokens": TOKENS, "same_host": False}
    with served(engine, **settings) as server:
        alice, bob = (line.split()[2] for line in TOKENS.split(";"))
        plane = server.dataport
        assert plane is not None
        with Stalled(server, alice):
            with tw.Client(address(server), timeout=TIMEOUT, token=alice) as client:
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
                assert (
                    client._transport._data.links is not None
                    and client._transport._data.links.usable()
                )
            assert moved(server, "tcp") == 0
            with tw.Client(address(server), timeout=TIMEOUT, token=bob) as client:
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
            assert moved(server, "tcp") == 1
        assert settles(lambda: plane.slots.held() == 0)


def settles(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` holds within TIMEOUT (the server's cleanup of a call may
    run a moment after its client has the status)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


class Stalled:
    """An InferStream call that takes a ticket, claims it on a data connection and
    sends half its payload: it holds a transfer until closed."""

    def __init__(self, server: TensorwireServer, token: str) -> None:
        encoder = _messages.infer_request("identity", BIG, None, 0, False)
        header = next(streaming.parts(encoder))
        self.done = threading.Event()

        def requests() -> Iterator[bytes]:
            yield header
            yield ASK_DATA
            self.done.wait(TIMEOUT)

        self.channel = grpc.insecure_channel(address(server))
        method = self.channel.stream_stream("/tensorwire.v1.TensorService/InferStream")
        metadata = (("authorization", f"Bearer {token}"),)
        self.responses = method(requests(), timeout=TIMEOUT, metadata=metadata)
        number, body = framing.split_part(next(self.responses))
        ticket = pb.DataTransfer.FromString(bytes(body))
        assert number == framing.PART_DATA and ticket.ticket
        self.sock = socket.create_connection(("127.0.0.1", ticket.port), timeout=TIMEOUT)
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, ticket.ticket))
        assert recv_exact(self.sock, len(ACCEPTED)) == ACCEPTED
        self.sock.sendall(encoder.header()[1][0][: BIG.nbytes // 2])

    def __enter__(self) -> Stalled:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()
        self.done.set()
        with contextlib.suppress(Exception):
            list(self.responses)  # failed: the connection went
        self.channel.close()


# ------------------------------------------------------------ E: refusal


@contextlib.contextmanager
def refusing(family: socket.AddressFamily, where: object) -> Iterator[socket.socket]:
    """A listener that closes each connection as soon as it comes: a busy server, or
    another one behind the same port."""
    kind = socket.SOCK_SEQPACKET if family == socket.AF_UNIX else socket.SOCK_STREAM
    listener = socket.socket(family, kind)
    listener.bind(where)
    listener.listen(16)
    stop = threading.Event()

    def refuse() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                sock, _ = listener.accept()
                sock.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(TIMEOUT)


@same_host_only
def test_a_refused_same_host_connection_takes_the_data_port(engine) -> None:  # type: ignore[no-untyped-def]
    with served(engine) as server:
        plane = server.dataport
        assert plane is not None and plane.local_name is not None
        name = f"tensorwire-refusing-{os.urandom(8).hex()}"
        with refusing(socket.AF_UNIX, "\0" + name):
            plane.local_name = name  # tickets name the refusing socket
            with tw.Client(address(server), timeout=TIMEOUT) as client:
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
                same_host = client._transport._data.same_host
                assert same_host is not None and same_host.detours._refusals[name] == 1
                # A short detour, not the ten minutes of an unreachable socket.
                assert same_host.detours._until[name] < time.monotonic() + 60
        assert moved(server, "tcp") == 1


@same_host_only
def test_refused_everywhere_the_call_sends_chunks_at_once(engine) -> None:  # type: ignore[no-untyped-def]
    """Both data paths close the connection before accepting the ticket: the call
    sends chunks (it used to wait out the ticket's 10 s and fail), and the client
    tries the data port again soon."""
    with served(engine) as server:
        plane = server.dataport
        assert plane is not None and plane.local_name is not None
        name = f"tensorwire-refusing-{os.urandom(8).hex()}"
        with (
            refusing(socket.AF_UNIX, "\0" + name),
            refusing(socket.AF_INET, ("127.0.0.1", 0)) as tcp,
        ):
            real = plane.port
            plane.local_name, plane.port = name, tcp.getsockname()[1]
            with tw.Client(address(server), timeout=TIMEOUT) as client:
                for k in range(3):
                    got = client.infer("identity", BIG + k)["output"]
                    np.testing.assert_array_equal(got, BIG + k)
                links = client._transport._data.links
                assert links is not None
                assert links.detours._until[None] < time.monotonic() + 60
            plane.port = real
        assert moved(server, "tcp") == moved(server, "shared_memory") == 0


def test_a_refused_tcp_connection_sends_chunks_and_asks_again(engine) -> None:  # type: ignore[no-untyped-def]
    with served(engine, same_host=False) as server:
        plane = server.dataport
        assert plane is not None
        with refusing(socket.AF_INET, ("127.0.0.1", 0)) as tcp:
            real, plane.port = plane.port, tcp.getsockname()[1]
            with tw.Client(address(server), timeout=TIMEOUT) as client:
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
                links = client._transport._data.links
                assert links is not None and links.detours._refusals[None] == 1
                plane.port = real
                links.detours._until[None] = 0.0  # as once the short detour is over
                np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)
        assert moved(server, "tcp") == 1


# ------------------------------------------------------------ F: killed downloads

#: A client that downloads ``identity``'s answer and, once the first bytes arrive,
#: says so and waits to be killed.
DOWNLOADER = """
import sys, time
import numpy as np
import tensorwire as tw
address, mib, data_plane = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
data = np.ones(mib << 18, np.float32)
def progress(p):
    if p.stage == "download" and p.done > 0:
        print("downloading", flush=True)
        time.sleep(600)
with tw.Client(address, timeout=600, data_plane=data_plane, same_host=False) as client:
    client.infer("identity", data, progress=progress)
"""

#: The server, with the garbage collector off from the start.
NO_GC_SERVER = """
import gc, sys
gc.disable()
from tensorwire_server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def rss(pid: int) -> int:
    """Resident bytes of process ``pid``."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def gc_free_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A server process that never collects garbage, without same-host transfers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_GC_SERVER, "--port", "0", "--device", "cpu", "--no-same-host"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        address = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if match := re.search(r"listening on ([\w.:]+)", line):
                address = match.group(1)
            if "server serving" in line:
                break
        assert address, "the server did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep it drained
        yield proc, address
    finally:
        proc.kill()
        proc.wait(TIMEOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("data_plane", [True, False], ids=["data-port", "grpc-stream"])
def test_killed_downloaders_leave_no_memory_without_a_gc(data_plane: bool) -> None:
    """Three clients killed while they download 128 MiB each: the server's memory
    comes back with no garbage collection (it used to keep each one's buffers, +128
    MiB a client, until a collection)."""
    mib = 128
    with gc_free_server() as (server, where):
        with tw.Client(where, timeout=120, same_host=False) as client:  # warm: 1 call
            big = np.ones(mib << 18, np.float32)
            np.testing.assert_array_equal(client.infer("identity", big)["output"], big)
            del big
        time.sleep(2)  # the heap trimmer runs once the server is idle
        base = rss(server.pid)
        for _ in range(3):
            killed = subprocess.Popen(
                [sys.executable, "-c", DOWNLOADER, where, str(mib), "1" if data_plane else "0"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert killed.stdout is not None
                ready, _, _ = select.select([killed.stdout], [], [], 120)
                assert ready and killed.stdout.readline().strip() == "downloading"
            finally:
                killed.kill()
                killed.wait(TIMEOUT)
        grown = rss(server.pid) - base
        deadline = time.monotonic() + TIMEOUT
        while grown >= 100 << 20 and time.monotonic() < deadline:
            time.sleep(0.5)
            grown = rss(server.pid) - base
        assert grown < 100 << 20, f"the server kept {grown >> 20} MiB of dead clients"
        with tw.Client(where, timeout=TIMEOUT) as client:  # and it serves on
            np.testing.assert_array_equal(client.infer("identity", BIG)["output"], BIG)


def test_a_full_budget_evicts_the_stale_anonymous_then_idle_never_busy() -> None:
    """The order in which a full budget makes room (data_budgets.Budget)."""
    pairs = [socket.socketpair() for _ in range(6)]
    try:
        budget = Budget(4)
        stale, busy, idle, fresh = (budget.admit(a)[0] for a, _ in pairs[:4])
        assert stale and busy and idle and fresh
        stale.since -= 2 * FRESH_SECONDS  # silent for a while: an attacker's, most likely
        fresh.since += 3600  # just came (however slow this machine is today)
        assert budget.claim(busy) and budget.claim(idle)
        budget.rest(idle)  # its transfer done: pooled by its client
        first, evicted = budget.admit(pairs[4][0])
        assert first is not None and evicted is stale and stale.gone
        assert not budget.claim(stale)  # it must leave its ticket alone
        assert budget.claim(first)
        second, evicted = budget.admit(pairs[5][0])
        assert second is not None and evicted is idle  # then the idle one, not a newcomer
        assert budget.claim(second)
        third, evicted = budget.admit(pairs[0][1])
        assert third is not None and evicted is fresh  # then a newcomer; never a busy one
        assert budget.claim(third)
        assert budget.admit(pairs[1][1]) == (None, None)  # all busy: refused
        assert len(budget) == 4
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# ------------------------------------------------------------ I: deadlines


def test_a_deadline_passing_while_the_response_arrives_is_deadline_exceeded(
    engine: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is slow to send a response's payloads on the data port and the
    call's deadline passes while the client reads them: DeadlineExceeded, not a broken
    connection (UNAVAILABLE, which the client would retry past its deadline)."""
    from tensorwire_server.dataport import listener as server_plane

    send_all = server_plane.dataport.send_all

    def slow(*args: Any) -> None:
        if threading.current_thread().name == "tensorwire-data-conn":  # the server's
            time.sleep(1.5)
        send_all(*args)

    with served(engine) as server:
        monkeypatch.setattr(server_plane.dataport, "send_all", slow)
        with tw.Client(address(server), stream_threshold=0, retries=0, same_host=False) as c:
            for _ in range(3):
                with pytest.raises(tw.DeadlineExceededError):
                    c.infer("identity", BIG, timeout=0.75)
            monkeypatch.setattr(server_plane.dataport, "send_all", send_all)
            np.testing.assert_array_equal(c.infer("identity", BIG, timeout=TIMEOUT)["output"], BIG)
        assert moved(server, "tcp") >= 1
