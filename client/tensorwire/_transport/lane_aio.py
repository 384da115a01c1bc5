"""AsyncClient's side of the fast lane: lane.py's LaneMethod on asyncio streams. A task
holds a connection for its call; a task cancelled (or past its deadline) mid-call
closes it, which cancels the call's work on the server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import grpc

from tensorwire._transport.connections import CONNECT_SECONDS
from tensorwire._transport.lane import (
    _OPEN_LANE_REQUEST,
    Lane,
    Watch,
    _within,
    broke,
    left,
    remaining,
    unacknowledged,
)
from tensorwire._transport.lane_frames import (
    answer,
    credentials,
    frame,
    late,
    opened,
)
from tensorwire.wire import lane
from tensorwire.wire.lane import (
    ACCEPTED,
    GRANT_BYTES,
    HELLO,
    HELLO_MAGIC,
    LOCAL_SEND_BUFFER,
    OPENING,
    RESPONSE,
)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AsyncLane(Lane):
    """Lane with asyncio streams as its connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: A fork's child: its parent's connections, kept unused (at most POOLED).
        self.inherited: list[Any] = []

    def fresh(self, conn: Any) -> bool:
        reader, writer = conn
        return not (reader.at_eof() or writer.is_closing() or reader._buffer)

    def discard(self, conn: Any) -> None:
        conn[1].transport.abort()

    def disown(self, conn: Any) -> None:
        # Kept, unused: closing a transport would touch the event loop's selector,
        # which a fork's child shares with its parent.
        self.inherited.append(conn)


class AsyncLaneMethod:
    """A grpc.aio unary callable whose calls take the lane when they can."""

    def __init__(self, path: str, fallback: Any, lane: AsyncLane, deserialize: Any) -> None:
        self.path = path
        self.fallback = fallback
        self.lane = lane
        self.deserialize = deserialize

    async def __call__(
        self, request: bytes, timeout: float | None = None, metadata: Any = None
    ) -> Any:
        # One deadline for the whole call, as lane.LaneMethod keeps it.
        at = None if timeout is None else time.monotonic() + timeout
        lane = self.lane
        if lane.usable(len(request)):
            conn = lane.take() or await self._open(at, metadata)
            if conn is not None:
                if len(request) <= lane.max_request:
                    return await self._call(conn, request, left(at), metadata)
                lane.give(conn)  # past what the grant said the server takes
        return await self.fallback(request, timeout=remaining(at), metadata=metadata)

    async def _open(self, at: float | None, metadata: Any) -> Stream | None:
        lane = self.lane
        try:
            wait = _within(left(at))
            given = credentials(metadata)
            granted = await lane.open_lane(_OPEN_LANE_REQUEST, timeout=wait, metadata=given)
            grant = granted.message
        except grpc.RpcError as exc:
            lane.refused(exc, spent=at is not None and time.monotonic() >= at)
            return None
        lane.granted(grant)
        address = lane.local_address(grant)
        if address is not None:
            try:
                async with asyncio.timeout(min(CONNECT_SECONDS, _within(left(at)))):
                    reader, writer = await asyncio.open_unix_connection(address)
            except (ConnectionRefusedError, FileNotFoundError):  # not on this host
                lane.far = grant.local_socket  # (or namespace): the data port takes it
            except (OSError, TimeoutError):
                pass  # a full backlog, say: the data port now, the Unix socket next time
            else:
                sock = writer.get_extra_info("socket")
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SEND_BUFFER)
                return await self._open_local(reader, writer, grant, at)
        try:
            async with asyncio.timeout(min(CONNECT_SECONDS, _within(left(at)))):
                reader, writer = await asyncio.open_connection(lane.host, grant.port)
        except (OSError, TimeoutError):
            lane.detours.unreachable(None)
            return None
        try:
            async with asyncio.timeout(_within(left(at))):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    unacknowledged(sock, lane)
                writer.write(OPENING)
                if lane.tls is not None:
                    await writer.start_tls(lane.tls, server_hostname=lane.server_name)
                writer.write(HELLO.pack(HELLO_MAGIC, grant.grant))
                if await reader.readexactly(len(ACCEPTED)) == ACCEPTED:
                    lane.detours.accepted(None)
                    return reader, writer
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError):
            pass
        writer.transport.abort()
        lane.refused(None)
        return None

    async def _open_local(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        grant: Any,
        at: float | None,
    ) -> Stream | None:
        """The connection to the server's Unix socket, once the server proved itself
        with the grant's ``local_proof`` (lane.LaneMethod._open_local's twin)."""
        try:
            async with asyncio.timeout(_within(left(at))):
                writer.write(OPENING + HELLO.pack(HELLO_MAGIC, grant.grant))
                got = await reader.readexactly(len(ACCEPTED) + GRANT_BYTES)
            if got == ACCEPTED + grant.local_proof:
                self.lane.detours.accepted(None)
                return reader, writer
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError):
            pass
        writer.transport.abort()
        self.lane.far = grant.local_socket
        return None

    async def _call(
        self, conn: Stream, request: bytes, timeout: float | None, metadata: Any
    ) -> Any:
        reader, writer = conn
        if timeout is not None and timeout <= 0:
            self.lane.give(conn)
            raise late()  # as gRPC answers a call with no time left
        done = False
        watch = Watch(self.lane.keepalive)
        try:
            async with asyncio.timeout(timeout):
                call_id, pieces = frame(self.path, request, timeout, metadata)
                writer.writelines(pieces)
                head = await _head(reader, writer, watch)
                while head[:4] == lane.PONG_MAGIC:  # the server is alive: wait on
                    head = await _head(reader, writer, watch)
                fields = opened(head, call_id)
                rest = await reader.readexactly(fields[3])
            done = True
        except TimeoutError:
            raise late() from None
        except (OSError, asyncio.IncompleteReadError, lane.LaneError) as exc:
            raise broke(exc, self.lane) from None
        finally:
            if not done:  # cut short: closing it cancels the call on the server
                writer.transport.abort()
        if watch.pinged is None:
            self.lane.give(conn)
        else:  # a PONG may still be on its way: not a connection to reuse
            writer.transport.abort()
        return answer(fields, memoryview(rest), self.deserialize)


async def _head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, watch: Watch) -> bytes:
    """The next frame head, pinging a server silent for a keepalive interval, which
    must then answer in time (the call's own deadline is the caller's to keep)."""
    while True:
        try:
            # A timeout scope, not wait_for: wait_for makes a task of every read.
            async with asyncio.timeout(watch.wait(time.monotonic())):
                return await reader.readexactly(RESPONSE.size)
        except TimeoutError:
            if watch.pinged is not None:
                raise OSError("the server stopped answering keepalive pings") from None
            writer.write(lane.PING)
            watch.pinged = time.monotonic()
