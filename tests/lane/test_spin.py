"""The event loop's selector that polls a moment after each fast-lane answer
(lane/spin.py): it returns what is ready as a sleeping one would, never later than the
loop's own timeout, and polls only while warm."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest
from conftest import engine_server, on_device
from conftest import server_address as address

import tensorwire as tw
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
