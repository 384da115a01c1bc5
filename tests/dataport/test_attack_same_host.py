"""Attacks on the same-host path, written as a hostile client on the server's host
would make them (issue 35: A, L, F, I): it keeps a writable mapping of every
segment it passes, and can be killed at any time. The server must keep serving,
answer correctly or with a clear status, and never let a kernel or a kept tensor see
memory the client can still write. Segments of the attacker's own making, sized and
sealed as it likes, are in test_attack_same_host_segments.py."""

from __future__ import annotations

import contextlib
import gc
import mmap
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import TOY_MODELS
from conftest import engine_server as serving
from conftest import server_address as address
from support.servers import TESTS, spawn_server

import tensorwire as tw
from tensorwire._transport import same_host as client_same_host
from tensorwire.errors import DeadlineExceededError, TensorwireError, UnavailableError
from tensorwire_server.dataport import same_host
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.skipif(not same_host.SUPPORTED, reason="same-host transfers: Linux")

TIMEOUT = 60
#: Seconds each kernel is attacked for: the unfixed server died within a few calls.
ATTACK_SECONDS = 2.5
#: An index no tensor here has: any mix of its bytes with 0's is 0 or out of range.
FAR = 1 << 40
#: What the killed clients' and the deadline's calls send.
PAYLOAD = np.arange(3 << 18, dtype=np.float32)  # 3 MiB


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
