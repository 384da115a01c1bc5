"""Finding K, as an attacker would try it: the metrics port, reachable without any
token, must not let connections pile up threads or sockets, nor keep Prometheus out.

The server runs in this process, so its threads are this process's threads."""

from __future__ import annotations

import contextlib
import gzip
import os
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings
from tensorwire_server.telemetry import metrics_endpoint

FLOOD = 500


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    settings = Settings(port=0, device="cpu", metrics_port=0)
    server = TensorwireServer(settings, build_engine(settings))
    server.start()
    assert server.metrics_port
    try:
        yield server.metrics_port
    finally:
        server.stop(None)


def threads() -> int:
    """Threads of this process, as Python and as the kernel count them."""
    return max(threading.active_count(), len(os.listdir("/proc/self/task")))


def scrape(port: int, path: str = "/metrics", **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as page:
            return page.status, dict(page.headers), page.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of file or reset), without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1 << 16, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` for up to ``seconds``; whether it came true."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; what came back before the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):  # the server may close before all of it is in
            sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


def test_idle_connections_cost_no_threads_and_are_closed(port: int) -> None:
    before = threads()
    with ExitStack() as stack:
        flood = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(FLOOD)
        ]
        # Before: one thread per connection, 522 threads for 500 connections.
        assert threads() - before < 20
        # Past its cap the server keeps only the newest idle ones...
        assert wait_until(
            lambda: sum(not closed_by_server(s) for s in flood) <= metrics_endpoint.MAX_CONNECTIONS,
            20,
        )
        # ...and Prometheus still gets in, during the flood.
        status, _, body = scrape(port)
        assert status == 200 and b"tensorwire_requests" in body
        assert threads() - before < 20
        # Idle ones are closed once the time to send a request is up (before: never).
        assert wait_until(lambda: all(closed_by_server(s) for s in flood), 30)
    status, _, _ = scrape(port)
    assert status == 200


def test_a_request_sent_a_byte_at_a_time_is_cut_off(port: int) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sent = 0
        end = time.monotonic() + 4 * metrics_endpoint.READ_TIMEOUT
        while sent < len(request) and time.monotonic() < end:
            try:
                sock.sendall(request[sent : sent + 1])
            except OSError:
                break  # reset: cut off
            sent += 1
            if closed_by_server(sock):
                break
            time.sleep(0.5)
        # Cut off long before the request was whole; nothing answered but the close.
        assert sent < len(request) // 2
        assert wait_until(lambda: closed_by_server(sock), 10)


def test_an_oversize_request_is_refused(port: int) -> None:
    padding = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    answer = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + padding * 64 + b"\r\n")
    # Refused after 8 KiB of its 64: 431, or (if the reset won the race) nothing.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
    # A body is refused too, whatever its size; so is anything but GET or HEAD.
    answer = raw(port, b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert raw(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(port, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )
    assert scrape(port, "/")[0] == 404
    assert scrape(port, "/../../etc/passwd")[0] == 404
    assert scrape(port)[0] == 200


def test_gzip_openmetrics_and_head_as_before(port: int) -> None:
    status, headers, body = scrape(port, **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"tensorwire_in_flight" in gzip.decompress(body)
    status, headers, body = scrape(port, Accept="application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, headers, body = scrape(port, "/metrics?name[]=tensorwire_in_flight")
    assert status == 200 and b"tensorwire_in_flight" in body and b"tensorwire_sessions" not in body
    answer = raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head and rest == b""


def test_a_flood_of_scrapes_is_answered_by_one_renderer(port: int) -> None:
    """Scrapes at the cap, all at once: each answered, no thread added for them."""
    before = threads()
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
    with ExitStack() as stack:
        socks = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
            for _ in range(metrics_endpoint.MAX_CONNECTIONS)
        ]
        for sock in socks:
            sock.sendall(request)
        assert threads() - before < 5
        for sock in socks:
            answer = b""
            while chunk := sock.recv(1 << 16):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"tensorwire_requests" in gzip.decompress(body)


def test_a_failing_collector_answers_500_and_the_port_keeps_serving() -> None:
    class Failing(Collector):
        fail = True

        def collect(self) -> Iterator[GaugeMetricFamily]:
            if Failing.fail:
                raise RuntimeError("collector broke")
            yield GaugeMetricFamily("fine", "A gauge.", value=1)

    registry = CollectorRegistry()
    registry.register(Failing())
    listener = metrics_endpoint.MetricsListener(registry, "127.0.0.1", 0)
    try:
        assert scrape(listener.port)[0] == 500
        Failing.fail = False
        status, _, body = scrape(listener.port)
        assert status == 200 and b"fine 1.0" in body
    finally:
        listener.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listener.port), timeout=5).close()
