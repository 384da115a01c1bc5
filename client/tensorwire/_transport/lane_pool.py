"""The client's fast-lane pool: a ``Lane`` per server (its idle connections, where
its lane is, when to try it again) and the switch that turns the lane on. The calls
that use it: lane.py (blocking sockets) and lane_aio.py (asyncio streams)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import grpc

from tensorwire._transport.connections import Detours
from tensorwire.errors import TensorwireError
from tensorwire.wire.lane import MAX_REQUEST

#: The environment variable that turns the lane off where ``fast_lane`` is not given
#: ("0", "false", "off", "no"): how a test run or a deployment keeps calls on gRPC.
ENV: Final = "TENSORWIRE_FAST_LANE"
#: The environment variable that sets how long a blocking call polls its connection
#: for the answer before it sleeps (seconds, 0 to 0.01; 0: it sleeps at once): the
#: name of the server's own ``fast_lane_spin``, which each end reads for itself.
SPIN_ENV: Final = "TENSORWIRE_FAST_LANE_SPIN"
#: A small call's answer comes within a few hundred µs; a caller that sleeps for it
#: pays the wake-up of an idle CPU (~100 µs on a VM: docs/performance.md).
SPIN_SECONDS: Final = 0.001
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
#: Whether a connection may go to the server's abstract Unix socket (Linux).
LOCAL: Final = sys.platform == "linux" and hasattr(socket, "AF_UNIX")
#: A grant's gRPC call: the serialized OpenLaneRequest, timeout, metadata -> response.
OpenLane = Callable[..., Any]


def wanted(fast_lane: bool | None) -> bool:
    """Whether a client uses the lane: ``fast_lane`` when given, else the environment
    (on unless TENSORWIRE_FAST_LANE says 0, false, off or no)."""
    if fast_lane is not None:
        return fast_lane
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def spin_seconds() -> float:
    """How long a blocking call polls for its answer: TENSORWIRE_FAST_LANE_SPIN's
    seconds where it is set, else SPIN_SECONDS."""
    given = os.environ.get(SPIN_ENV, "").strip()
    if not given:
        return SPIN_SECONDS
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 0.01:
        raise ValueError(f"{SPIN_ENV} must be 0 to 0.01 seconds, not {given!r}")
    return seconds


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
        # Before a grant says the server's limit: the lane's own (a call past a
        # grant's gives its connection back and goes by gRPC).
        self.max_request = MAX_REQUEST
        self.detours: Detours[None] = Detours()
        self.idle: list[tuple[float, Any]] = []
        self.lock = threading.Lock()
        #: The process the pooled connections belong to: a fork's child shares its
        #: parent's sockets, and must not use them.
        self.pid = os.getpid()
        self.closed = False
        #: Keepalive interval and timeout in seconds: the channel's (set_keepalive).
        self.keepalive = (60.0, 20.0)
        #: The server's Unix socket that could not be reached or did not prove itself
        #: (another host, another network namespace): its connections go to the data
        #: port. A server started again names another.
        self.far = ""
        #: Seconds a call polls for its answer before it sleeps (lane.py).
        self.spin = spin_seconds()
        #: Calls running on this lane now (blocking ones): only a lone caller polls,
        #: so that callers on other threads are not kept from the GIL.
        self.calling = 0

    def local_address(self, grant: Any) -> str | None:
        """The Unix socket (abstract: a leading NUL) a grant's connection tries first;
        None: the data port."""
        name: str = grant.local_socket
        if not name or not LOCAL or name == self.far:
            return None
        return "\0" + name

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


#: poll, not select: select refuses descriptors past 1024 (a busy process). Windows
#: has no poll, and its select has no such limit.
_POLL: Final = hasattr(select, "poll")


def _quiet(sock: socket.socket) -> bool:
    """Whether an idle connection has nothing to read: a server that closed it (idle,
    evicted, stopped) made it readable."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        if not _POLL:
            return not select.select([sock], [], [], 0)[0]
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _close(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
