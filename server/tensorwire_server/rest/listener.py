"""The REST port: aiohttp's low-level server (no router, no middleware: ``Endpoints``
routes) on the event loop grpc.aio serves from, so that a REST call and a gRPC call
share one loop, one Compute pool and one gate. TLS as gRPC's (the same files), plain
text off loopback refused as gRPC refuses it, and a cap on connections.

Why aiohttp's low-level server: it runs on the loop we have (an ASGI server such as
uvicorn wants a loop and a process of its own, and would reach the gate and the
service across threads), its request parser is C (llhttp), and its body is a stream
we read into one buffer of the declared size; docs/kserve.md ("REST") gives the
measurements it was chosen by.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Final

from aiohttp import web_server

from tensorwire_server.rest.endpoints import Endpoints

log = logging.getLogger(__name__)

#: Sent to a connection past the cap, which is then closed (no request of it is read).
_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _Refused(asyncio.Protocol):
    """A connection over the cap: told so, and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        message = b'{"error": "the server holds its most REST connections (http_connections)"}'
        transport.write(_BUSY % (len(message), message))  # type: ignore[attr-defined]
        transport.close()


class RestServer:
    """The v2 REST API on ``host``:``port`` (0: any free one), on the running loop."""

    def __init__(
        self,
        endpoints: Endpoints,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        connections: int,
        keepalive: float = 75.0,
    ) -> None:
        self.endpoints = endpoints
        self.host = host
        self.requested_port = port
        self.tls = tls
        #: Connections held at once; past it a new one is answered 503 and closed.
        self.connections = connections
        self.server = web_server.Server(
            endpoints,
            # A body is read as it is: a compressed one could inflate without bound.
            auto_decompress=False,
            keepalive_timeout=keepalive,
            access_log=None,  # the gate writes the access log, as for gRPC
            max_line_size=8190,
            max_field_size=8190,
            # After a refusal that leaves a body unread, its sender gets this long to
            # see the answer before the connection closes under it (aiohttp's 10 s
            # would let a refused sender hold the connection that long).
            lingering_time=2.0,
        )
        self.listener: asyncio.Server | None = None
        self.port = 0

    async def bind(self) -> int:
        """Bind (not yet answering: ``start``); the port bound."""
        loop = asyncio.get_running_loop()
        server = self.server

        def connection() -> Any:
            if len(server.connections) >= self.connections:
                return _Refused()
            return server()

        self.listener = await loop.create_server(
            connection,
            self.host,
            self.requested_port,
            ssl=self.tls,
            backlog=256,
            start_serving=False,
        )
        self.port = self.listener.sockets[0].getsockname()[1]
        return self.port

    async def start(self) -> None:
        """Answer connections."""
        assert self.listener is not None, "bind first"
        await self.listener.start_serving()

    async def close(self, grace: float) -> None:
        """Stop listening, let responses being written finish for ``grace`` seconds
        (the gate already refuses new calls and waited for those running), close."""
        if self.listener is not None:
            self.listener.close()
        await self.server.shutdown(grace)
        if self.listener is not None:
            await self.listener.wait_closed()
