"""Both ends' polling. The server's event loop selector polls a moment after each
fast-lane answer (lane/spin.py): it returns what is ready as a sleeping one would,
never later than the loop's own timeout, and polls only while warm. A blocking
client's lone caller polls its connection a moment for the answer before it sleeps
(the client's lane.py): every answer arrives whole whether it comes within the poll or
after it, and only a lone caller polls."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest
from conftest import TOY_MODELS, engine_server, on_device
from conftest import server_address as address

import tensorwire as tw
from tensorwire._transport import lane as client_lane
from tensorwire._transport import lane_pool
from tensorwire_server.lane.spin import SpinningSelector
from tensorwire_server.server import build_engine
from tensorwire_server.settings import Settings

TIMEOUT = 20


def pair(selector: SpinningSelector) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    selector.register(b, 1)  # EVENT_READ
    return a, b


def test_a_warm_selector_returns_what_arrives_while_it_polls() -> None:
    with SpinningSelector(0.5) as selector:
        a, b = pair(selector)
        with a, b:
            selector.warm()
            threading.Timer(0.05, a.send, args=(b"x",)).start()
            ready = selector.select(timeout=5)
            assert [key.fileobj for key, _ in ready] == [b]


def test_it_keeps_the_loops_timeout_and_sleeps_once_cold() -> None:
    with SpinningSelector(0.05) as selector:
        a, b = pair(selector)
        with a, b:
            selector.warm()
            assert selector.select(timeout=0.01) == []  # the loop's timeout, shorter
            began = time.monotonic()
            assert selector.select(timeout=0.2) == []  # polls the rest of 50 ms, sleeps
            assert time.monotonic() - began >= 0.19  # then waits out its own timeout
            threading.Timer(0.05, a.send, args=(b"x",)).start()
            assert len(selector.select(timeout=5)) == 1  # cold: a plain, sleeping select


def test_off_it_never_polls() -> None:
    with SpinningSelector(0.0) as selector:
        selector.warm()
        assert selector._until == 0.0


def test_a_server_serves_the_lane_with_or_without_it() -> None:
    engine = build_engine(on_device(Settings(device="cpu")))
    x = np.ones((1, 16), np.float32)
    for spin in (0.0, 0.002):
        with contextlib.contextmanager(engine_server)(engine, fast_lane_spin=spin) as server:
            assert server._selector.seconds == spin
            with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
                for _ in range(20):
                    np.testing.assert_array_equal(client.infer("identity", x)["output"], x)
            assert server.lane is not None and server.lane.answered >= 20


def test_the_setting_is_bounded() -> None:
    with pytest.raises(ValueError, match="fast_lane_spin"):
        Settings(fast_lane_spin=1.0)
    with pytest.raises(ValueError, match="fast_lane_spin"):
        Settings(fast_lane_spin=-0.001)


def test_the_clients_poll_is_set_by_the_servers_variable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(lane_pool.SPIN_ENV, raising=False)
    assert lane_pool.spin_seconds() == lane_pool.SPIN_SECONDS
    for given, seconds in (("0", 0.0), ("0.002", 0.002), (" 0.01 ", 0.01)):
        monkeypatch.setenv(lane_pool.SPIN_ENV, given)
        assert lane_pool.spin_seconds() == seconds
    for wrong in ("1", "-0.001", "soon"):
        monkeypatch.setenv(lane_pool.SPIN_ENV, wrong)
        with pytest.raises(ValueError, match=lane_pool.SPIN_ENV):
            tw.Client("127.0.0.1:1", fast_lane=True)


def test_a_lone_caller_polls_for_its_answer_and_sleeps_past_the_poll(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    polls: list[bytes] = []
    polled = client_lane._polled

    def counted(sock, seconds):  # type: ignore[no-untyped-def]
        got = polled(sock, seconds)
        polls.append(got)
        return got

    monkeypatch.setattr(client_lane, "_polled", counted)
    engine = build_engine(on_device(Settings(device="cpu", models=TOY_MODELS)))
    small = np.ones((1, 16), np.float32)
    large = np.arange(64 << 10, dtype=np.float32)  # 256 KiB: its answer in many reads
    with (
        contextlib.contextmanager(engine_server)(engine) as server,
        tw.Client(address(server), timeout=None, fast_lane=True) as client,
    ):
        lane = client._transport._methods["Infer"].lane
        lane.spin = 0.01
        for _ in range(20):
            np.testing.assert_array_equal(client.infer("identity", small)["output"], small)
        # The rest of a large answer is read with the call's own wait (none: no
        # deadline), not the poll's.
        np.testing.assert_array_equal(client.infer("identity", large)["output"], large)
        # An answer that comes after the poll: the caller sleeps for it.
        assert client.infer("sleeper", np.array(0.1))["output"] == 0.1
        assert polls[-1] == b""
        assert any(polls[:20])  # a small answer within 10 ms of polling
        (sock,) = [conn for _, conn in lane.idle]
        assert sock.gettimeout() != 0.0  # what the poll changed, put back
        # A deadline shorter than the poll bounds it.
        with pytest.raises(tw.DeadlineExceededError):
            client.infer("sleeper", np.array(1.0), timeout=0.005)
        assert lane.calling == 0


def test_callers_at_once_do_not_poll(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = build_engine(on_device(Settings(device="cpu", models=TOY_MODELS)))
    with (
        contextlib.contextmanager(engine_server)(engine) as server,
        tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client,
    ):
        lane = client._transport._methods["Infer"].lane
        client.infer("identity", np.ones((1, 16), np.float32))
        lane.spin = 0.01
        spins: list[float] = []
        exchange = client_lane.LaneMethod._exchange

        def seen(self, sock, request, timeout, metadata, spin):  # type: ignore[no-untyped-def]
            spins.append(spin)
            return exchange(self, sock, request, timeout, metadata, spin)

        monkeypatch.setattr(client_lane.LaneMethod, "_exchange", seen)
        # One caller sleeps on the server while the other calls: the second polls
        # only if it is alone.
        slow = threading.Thread(target=client.infer, args=("sleeper", np.array(0.5)))
        slow.start()
        deadline = time.monotonic() + TIMEOUT
        while lane.calling == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.infer("identity", np.ones((1, 16), np.float32))
        slow.join()
        assert sorted(spins) == [0.0, 0.01]
        assert lane.calling == 0
