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
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc

from tensorwire._transport.connections import ANSWER_SECONDS, CONNECT_SECONDS, Detours
from tensorwire._transport.lane_frames import (
    LaneRpcError,
    answer,
    check_answers,
    credentials,
    frame,
    late,
    sizes,
)
from tensorwire._transport.methods import RESPONSES, method_path
from tensorwire.errors import TensorwireError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import lane
from tensorwire.wire.codec import receiver
from tensorwire.wire.dataport import DataPortError, recv_exact
from tensorwire.wire.lane import ACCEPTED, HELLO, HELLO_MAGIC, OPENING, RESPONSE

#: The environment variable that turns the lane off where ``fast_lane`` is not given
#: ("0", "false", "off", "no"): how a test run or a deployment keeps calls on gRPC.
ENV: Final = "TENSORWIRE_FAST_LANE"
#: Idle connections kept per server: as many as calls a client makes at once, up to
#: this (each new one costs a grant's gRPC call and a connect); past it, closed when done.
POOLED: Final = 64
#: Seconds an idle connection is kept: less than the server's 300, so that the
#: client, not the server, ends an idle connection, and never sends on one the server
#: is closing.
IDLE_SECONDS: Final = 240.0
#: Seconds between resolutions of a lane's target name: a fleet that grows behind the
#: name is seen this soon, and its calls then go to gRPC's round robin.
RESOLVE_SECONDS: Final = 5.0
#: A grant's gRPC call: the serialized OpenLaneRequest, timeout, metadata -> response.
OpenLane = Callable[..., Any]
_OPEN_LANE_REQUEST: Final = pb.OpenLaneRequest().SerializeToString()


def wanted(fast_lane: bool | None) -> bool:
    """Whether a client uses the lane: ``fast_lane`` when given, else the environment
    (on unless TENSORWIRE_FAST_LANE says 0, false, off or no)."""
    if fast_lane is not None:
        return fast_lane
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


#: A grant's call that ended so keeps a client off the lane for a while (growing): a
#: refusal, or an overloaded server's (each call would otherwise pay a failing grant's
#: call before its gRPC one).
_REFUSALS: Final = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


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


class Lane:
    """A client's lane to one server: where it is, its idle connections, its grant's
    gRPC method, and when to try it again after it could not be had."""

    def __init__(
        self,
        host: str,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        open_lane: OpenLane,
        resolve: Callable[[], list[str]] | None = None,
    ) -> None:
        self.host = host
        #: The addresses the target resolves to now ([]: one server); None: it names
        #: one server for good (an IP address).
        self.resolve = resolve
        self._one: tuple[float, bool] = (-RESOLVE_SECONDS, True)
        self.tls = tls
        self.server_name = server_name or host
        self.open_lane = open_lane
        #: The data port and the largest request the server takes, from a grant.
        self.port = 0
        self.max_request = 1 << 20
        self.detours: Detours[None] = Detours()
        self.idle: list[tuple[float, Any]] = []
        self.lock = threading.Lock()
        #: The process the pooled connections belong to: a fork's child shares its
        #: parent's sockets, and must not use them.
        self.pid = os.getpid()
        self.closed = False
        #: Keepalive interval and timeout in seconds: the channel's (set_keepalive).
        self.keepalive = (60.0, 20.0)

    def usable(self, size: int) -> bool:
        """Whether a request of ``size`` bytes should try the lane now."""
        return (
            not self.closed
            and size <= self.max_request
            and self.one_server()
            and self.detours.open(None)
        )

    def one_server(self) -> bool:
        """Whether the target reaches one server, its name resolved again every
        RESOLVE_SECONDS: behind a name of several replicas a lane would hold every
        call on whichever replica its connections reached (and a grant is good only
        on the replica that gave it), so gRPC's round robin carries those calls."""
        if self.resolve is None:
            return True
        when, one = self._one
        now = time.monotonic()
        if now - when > RESOLVE_SECONDS:
            try:
                one = len(self.resolve()) <= 1
            except (OSError, TensorwireError):
                one = False  # it does not resolve now: gRPC says so in its words
            self._one = (now, one)
        return one

    # The pool's three hooks, for blocking sockets (lane_aio.AsyncLane: streams).
    def fresh(self, conn: Any) -> bool:
        """Whether idle ``conn`` may carry a call (a server that closed it made it
        readable)."""
        return _quiet(conn)

    def discard(self, conn: Any) -> None:
        """Close ``conn``: no longer the pool's."""
        _close(conn)

    def disown(self, conn: Any) -> None:
        """Let go of ``conn``, a fork's parent's, without a word on it."""
        _close(conn)  # this process's descriptor only: the parent's stays open

    def forked(self) -> list[tuple[float, Any]]:
        """After a fork, in the child: the parent's idle connections, no longer this
        pool's (empty in the process that made them)."""
        if os.getpid() == self.pid:
            return []
        with self.lock:
            self.pid = os.getpid()
            inherited, self.idle = self.idle, []
        return inherited

    def take(self) -> Any:
        """An idle connection (None: none); the stale ones go."""
        for _, conn in self.forked():
            self.disown(conn)
        now = time.monotonic()
        while True:
            with self.lock:
                if not self.idle:
                    return None
                since, conn = self.idle.pop()
            if now - since < IDLE_SECONDS and self.fresh(conn):
                return conn
            self.discard(conn)

    def give(self, conn: Any) -> None:
        """Keep ``conn`` for the next call (or close it: the pool is full, or closed)."""
        with self.lock:
            if not self.closed and len(self.idle) < POOLED:
                self.idle.append((time.monotonic(), conn))
                return
        self.discard(conn)

    def granted(self, response: Any) -> None:
        """Learn where the lane is from a grant (an OpenLaneResponse)."""
        self.port = response.port
        self.max_request = response.max_request_bytes

    def refused(self, error: grpc.RpcError | None, spent: bool = False) -> None:
        """No lane now: gRPC for a while (a server without one: for long; one refusing
        or overloaded: a while, growing; one that answered the grant's call with a
        passing status, such as a starting server's UNAVAILABLE: only this call, which
        gRPC then answers as it would). ``spent``: the call's own deadline cut the
        grant's call short, which says nothing of the server."""
        code = getattr(error, "code", lambda: None)()
        if spent and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
            self.detours.unreachable(None)
        elif error is None or code in _REFUSALS:
            self.detours.refused(None)

    def close(self) -> None:
        """Close every idle connection, and each one given from now on."""
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        for _, conn in idle:
            self.discard(conn)


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
                return self._call(sock, request, left(at), metadata)
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

    def _call(
        self, sock: socket.socket, request: bytes, timeout: float | None, metadata: Any
    ) -> Any:
        if timeout is not None and timeout <= 0:
            self.lane.give(sock)
            raise late()  # as gRPC answers a call with no time left
        at = None if timeout is None else time.monotonic() + timeout
        watch = Watch(self.lane.keepalive)
        call_id, (head, body) = frame(self.path, request, timeout, metadata)
        try:
            sock.settimeout(timeout)
            if len(body) < 65536:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
            got = bytearray()
            while len(got) < RESPONSE.size:
                got += self._receive(sock, at, watch)
                while len(got) >= RESPONSE.size and got[:4] == lane.PONG_MAGIC:
                    del got[: RESPONSE.size]  # the server is alive: wait on
            total = RESPONSE.size + sizes(bytes(got[: RESPONSE.size]))
            check_answers(got, call_id)
            if len(got) < total:
                buf = bytearray(total)
                buf[: len(got)] = got
                view = memoryview(buf)
                done = len(got)
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
        view = memoryview(got)
        return answer(bytes(view[: RESPONSE.size]), view[RESPONSE.size :], self.deserialize)

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
                piece = sock.recv(65536)
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


def _quiet(sock: socket.socket) -> bool:
    """Whether an idle connection has nothing to read: a server that closed it (idle,
    evicted, stopped) made it readable."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        # poll, not select: select refuses descriptors past 1024 (a busy process).
        # Windows has no poll, and its select has no such limit.
        if not hasattr(select, "poll"):
            return not select.select([sock], [], [], 0)[0]
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _close(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
