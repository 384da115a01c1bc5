"""The client's side of the fast lane (the format: tensorwire/wire/lane.py): unary calls
below the streaming threshold sent as frames on a pooled data-port connection instead
of gRPC, with gRPC's statuses, so that retries, pushback and the exception mapping
stay the transport's own.

``LaneMethod`` stands in for a grpc unary callable: it tries the lane and falls back to
the callable it wraps when the lane cannot be had (no grant, nothing listening, a
server without a lane), remembering it for a while (``connections.Detours``). A lane
that breaks mid-call fails that call with UNAVAILABLE, which the transport retries by
gRPC's rules. Each call holds a connection of its own while it runs (one thread or
task per connection: no hand-over between threads, which costs more than the call;
docs/performance.md), and gives it back to the pool when answered; a call cut short
(deadline, cancellation) closes its connection, which cancels its work on the server.

Blocking sockets here (Client); lane_aio.py is AsyncClient's twin.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc

from tensorwire._transport.connections import ANSWER_SECONDS, CONNECT_SECONDS
from tensorwire._transport.lane_frames import (
    LaneRpcError,
    answer,
    credentials,
    frame,
    late,
    opened,
)
from tensorwire._transport.lane_pool import Lane, _close, wanted
from tensorwire._transport.methods import RESPONSES, method_path
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import lane
from tensorwire.wire.codec import receiver
from tensorwire.wire.dataport import DataPortError, recv_exact
from tensorwire.wire.lane import (
    ACCEPTED,
    GRANT_BYTES,
    HELLO,
    HELLO_MAGIC,
    LOCAL_SEND_BUFFER,
    OPENING,
    RESPONSE,
)

__all__ = ["Lane", "LaneMethod", "keepalive", "lane_methods", "wanted"]

_OPEN_LANE_REQUEST: Final = pb.OpenLaneRequest().SerializeToString()
#: The most bytes one receive takes. An answer larger than this (one that can carry
#: payloads outside protobuf: codec.INLINE_LIMIT) is read into a writable buffer.
_PIECE: Final = 65536


def broke(exc: BaseException, lane: Lane) -> LaneRpcError:
    """The status of a call whose connection to ``lane``'s server broke: UNAVAILABLE,
    retried as gRPC's, naming the server (as gRPC's names the address it lost). A
    connection the network failed (no route, unacknowledged, reset) sends the next
    calls to gRPC a while: its retry then waits on gRPC's own connection, which knows
    the peer's state, rather than on a grant that server may never answer."""
    if isinstance(exc, OSError):
        lane.detours.unreachable(None)
    return LaneRpcError(
        grpc.StatusCode.UNAVAILABLE,
        f"the fast-lane connection to {lane.host}:{lane.port} broke during the call: {exc}",
    )


def unacknowledged(sock: socket.socket, lane: Lane) -> None:
    """Give up on ``sock`` when what it sent goes unacknowledged for the keepalive
    timeout, as gRPC's connections do (TCP_USER_TIMEOUT, Linux): a server whose link
    is cut is then UNAVAILABLE in that time, not silent until the call's deadline."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(lane.keepalive[1] * 1000))


class LaneMethod:
    """A grpc unary callable (``fallback``) whose calls take the lane when they can."""

    def __init__(
        self, path: str, fallback: Any, lane: Lane, deserialize: Callable[[bytes], Any]
    ) -> None:
        self.path = path
        self.fallback = fallback
        self.lane = lane
        #: The response's deserializer: the one gRPC's callable has (our codec's).
        self.deserialize = deserialize

    def __call__(self, request: bytes, timeout: float | None = None, metadata: Any = None) -> Any:
        # One deadline for the whole call: the grant, the connection and the call (or
        # gRPC's) each get what the steps before them left.
        at = None if timeout is None else time.monotonic() + timeout
        lane = self.lane
        if lane.usable(len(request)):
            sock = lane.take() or self._open(at, metadata)
            if sock is not None:
                if len(request) <= lane.max_request:
                    return self._call(sock, request, at, metadata)
                lane.give(sock)  # past what the grant said the server takes
        return self.fallback(request, timeout=remaining(at), metadata=metadata)

    def _open(self, at: float | None, metadata: Any) -> socket.socket | None:
        """A new connection with a fresh grant, within the deadline ``at``; None when
        none can be had now."""
        lane = self.lane
        try:
            grant = lane.open_lane(
                _OPEN_LANE_REQUEST, timeout=_within(left(at)), metadata=credentials(metadata)
            ).message
        except grpc.RpcError as exc:
            lane.refused(exc, spent=at is not None and time.monotonic() >= at)
            return None
        lane.granted(grant)
        local = connect_local(lane, grant, left(at))
        if local is not None:
            return self._open_local(local, grant)
        try:
            wait = min(CONNECT_SECONDS, _within(left(at)))
            sock = socket.create_connection((lane.host, grant.port), timeout=wait)
        except OSError:
            lane.detours.unreachable(None)  # nothing listens there, or no route
            return None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            unacknowledged(sock, lane)
            sock.settimeout(_within(left(at)))
            sock.sendall(OPENING)
            if lane.tls is not None:
                sock = lane.tls.wrap_socket(sock, server_hostname=lane.server_name)
            sock.sendall(HELLO.pack(HELLO_MAGIC, grant.grant))
            if recv_exact(sock, len(ACCEPTED)) == ACCEPTED:
                lane.detours.accepted(None)
                return sock
        except (OSError, EOFError, DataPortError):
            pass
        _close(sock)
        lane.refused(None)  # it answered, but not as a lane: gRPC, a while
        return None

    def _open_local(self, sock: socket.socket, grant: Any) -> socket.socket | None:
        """``sock``, connected to the server's Unix socket, once the server proved
        itself with the grant's ``local_proof``; None when it did not: the data port
        from now on (this call goes by gRPC: its grant is spent)."""
        try:
            sock.sendall(OPENING + HELLO.pack(HELLO_MAGIC, grant.grant))
            if recv_exact(sock, len(ACCEPTED) + GRANT_BYTES) == ACCEPTED + grant.local_proof:
                self.lane.detours.accepted(None)
                return sock
        except (OSError, EOFError, DataPortError):
            pass
        _close(sock)
        self.lane.far = grant.local_socket
        return None

    def _call(self, sock: socket.socket, request: bytes, at: float | None, metadata: Any) -> Any:
        """The call on ``sock``, within the deadline ``at`` (the one ``__call__`` set);
        it polls for its answer (``_polled``) when it is its lane's only call."""
        lane = self.lane
        with lane.lock:
            lane.calling += 1
            alone = lane.calling == 1
        try:
            return self._exchange(sock, request, at, metadata, lane.spin if alone else 0.0)
        finally:
            with lane.lock:
                lane.calling -= 1

    def _exchange(
        self, sock: socket.socket, request: bytes, at: float | None, metadata: Any, spin: float
    ) -> Any:
        timeout = left(at)
        if timeout is not None and timeout <= 0:
            self.lane.give(sock)
            raise late()  # as gRPC answers a call with no time left
        watch = Watch(self.lane.keepalive)
        call_id, (head, body) = frame(self.path, request, timeout, metadata)
        try:
            sock.settimeout(timeout)
            if len(body) < 65536:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
            # The answer's head, past any PONGs (the server is alive: wait on). Its
            # first bytes usually hold the whole of a small answer: they are kept as
            # they came, with no copy into a buffer.
            got: bytes | bytearray = b""
            if spin:
                got = _polled(sock, spin if at is None else min(spin, at - time.monotonic()))
            while True:
                while len(got) < RESPONSE.size:
                    got += self._receive(sock, at, watch)
                if got[:4] != lane.PONG_MAGIC:
                    break
                got = got[RESPONSE.size :]
            fields = opened(got, call_id)
            total = RESPONSE.size + fields[3]
            if len(got) < total or total > _PIECE:
                # The rest into one writable buffer of the answer's size, which the
                # answer's large payloads then view (no copies: Received.owned).
                buf = bytearray(total)
                done = min(len(got), total)
                buf[:done] = got[:done]
                view = memoryview(buf)
                while done < total:
                    _arm(sock, at)
                    n = sock.recv_into(view[done:])
                    if not n:
                        raise EOFError("the server closed the connection")
                    done += n
                got = buf
        except TimeoutError:
            _close(sock)  # the server sees it closed, and cancels the call
            raise late() from None
        except (OSError, EOFError, lane.LaneError) as exc:
            _close(sock)
            raise broke(exc, self.lane) from None
        except BaseException:
            _close(sock)  # interrupted: nothing is known of what is left on it
            raise
        if watch.pinged is None:
            self.lane.give(sock)
        else:  # a PONG may still be on its way: not a connection to reuse
            _close(sock)
        return answer(fields, memoryview(got)[RESPONSE.size : total], self.deserialize)

    @staticmethod
    def _receive(sock: socket.socket, at: float | None, watch: Watch) -> bytes:
        """The next bytes of the answer, within the deadline ``at``; pinging a server
        that says nothing for a keepalive interval, which must then answer in time."""
        while True:
            now = time.monotonic()
            if at is not None and at <= now:
                raise TimeoutError("the call's deadline passed")
            wait = watch.wait(now)
            sock.settimeout(wait if at is None else min(at - now, wait))
            try:
                piece = sock.recv(_PIECE)
            except TimeoutError:
                if at is not None and time.monotonic() >= at:
                    raise
                if watch.pinged is not None:
                    raise OSError("the server stopped answering keepalive pings") from None
                sock.sendall(lane.PING)
                watch.pinged = time.monotonic()
                continue
            if not piece:
                raise EOFError("the server closed the connection")
            return piece


def _polled(sock: socket.socket, seconds: float) -> bytes:
    """The answer's first bytes if they come within ``seconds`` of polling the socket
    (b"": not yet; the caller then sleeps in recv). Polling costs the CPU it spins on,
    and saves the wake-up of a sleeping one, which on a VM costs about as much as a
    small call's whole server side (docs/performance.md)."""
    waits = sock.gettimeout()
    sock.settimeout(0.0)
    recv = sock.recv
    end = time.perf_counter() + seconds
    try:
        while True:
            try:
                piece = recv(_PIECE)
            except (BlockingIOError, ssl.SSLWantReadError):
                if time.perf_counter() >= end:
                    return b""
                _yield_cpu()  # to whatever else would run here (the server, say)
                continue
            if not piece:
                raise EOFError("the server closed the connection")
            return piece
    finally:
        sock.settimeout(waits)


def _no_yield() -> None:
    """Where the platform has no sched_yield (Windows): poll on."""


_yield_cpu = getattr(os, "sched_yield", _no_yield)


class Watch:
    """A call's keepalive: ping after ``interval`` seconds of silence, and give up
    ``timeout`` seconds after a ping that brought nothing."""

    def __init__(self, keepalive: tuple[float, float]) -> None:
        self.interval, self.timeout = keepalive
        self.pinged: float | None = None

    def wait(self, now: float) -> float:
        """Seconds to wait for bytes before the next step (a ping, or giving up)."""
        if self.pinged is None:
            return self.interval
        return max(self.pinged + self.timeout - now, 0.001)


def lane_methods(
    methods: dict[str, Any], lane: Any, kind: type[LaneMethod] | Any = LaneMethod
) -> dict[str, Any]:
    """``methods`` (a channel's callables by name) with every unary TensorService
    method but OpenLane going through ``lane`` when it can (``kind``: LaneMethod, or
    lane_aio's twin)."""
    out = dict(methods)
    for name, cls in RESPONSES.items():
        if name != "OpenLane":
            out[name] = kind(method_path(name), methods[name], lane, receiver(cls))
    return out


def connect_local(lane: Lane, grant: Any, timeout: float | None) -> socket.socket | None:
    """A blocking socket connected to the Unix socket ``grant`` names (timeout:
    the call's); None where there is none, or it is not here (then never again)."""
    address = lane.local_address(grant)
    if address is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(OSError):  # a large request in one send (capped by the kernel)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SEND_BUFFER)
    try:
        sock.settimeout(_within(timeout))
        sock.connect(address)
        return sock
    except OSError as exc:  # the grant is still good: the data port takes it
        _close(sock)
        if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
            lane.far = grant.local_socket  # not on this host (or namespace)
        return None  # else a full backlog, say: the Unix socket again next time


def left(at: float | None) -> float | None:
    """Seconds until the deadline ``at`` (None: none; 0 or less: passed)."""
    return None if at is None else at - time.monotonic()


def remaining(at: float | None) -> float | None:
    """What is left of the deadline ``at`` for the next step; the deadline's error
    when nothing is."""
    wait = left(at)
    if wait is not None and wait <= 0:
        raise late()
    return wait


def _within(timeout: float | None) -> float:
    """A grant's and a connection's wait: ANSWER_SECONDS, or less when the call has less."""
    return ANSWER_SECONDS if timeout is None else max(min(timeout, ANSWER_SECONDS), 0.001)


def keepalive(options: Sequence[tuple[str, Any]]) -> tuple[float, float]:
    """The keepalive interval and timeout (seconds) channel ``options`` set (the last
    of each key wins, as in the channel); the lane keeps the same watch on a call."""
    given = dict(options)
    interval = given.get("grpc.keepalive_time_ms", 60_000)
    timeout = given.get("grpc.keepalive_timeout_ms", 20_000)
    timeout = min(timeout, given.get("grpc.http2.ping_timeout_ms", timeout))
    return max(interval, 1) / 1000, max(timeout, 1) / 1000


def _arm(sock: socket.socket, at: float | None) -> None:
    if at is not None:
        left = at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed")
        sock.settimeout(left)
