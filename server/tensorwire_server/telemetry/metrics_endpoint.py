"""The Prometheus endpoint: a small HTTP listener that hostile clients cannot pile up.

prometheus_client's own server starts a thread per connection and waits on each for
ever: anyone who reached the port held 500 threads with 500 idle sockets. This one runs
on one thread of its own (an asyncio loop, apart from the gRPC loop), and renders the
exposition on one more:

- at most ``max_connections`` connections; past that a new one evicts the connection
  that has waited longest for its request (a scraper sends its request at once, so the
  ones evicted are idle), or is closed at once while every one is being answered;
- a request's head must arrive whole within ``read_timeout`` seconds (a request sent a
  byte at a time is cut off) and in at most ``MAX_HEAD`` bytes; bodies are refused;
- one request per connection, answered with ``Connection: close`` (as prometheus_client's
  server did), and the answer must be taken within ``write_timeout`` seconds;
- GET and HEAD of ``/metrics`` only; gzip, OpenMetrics and ``name[]`` on request, as
  prometheus_client's server;
- scrapes that arrive while the exposition is rendered wait for the next rendering and
  share it, and renderings are ``SPACING`` apart: a flood of scrapes costs the server a
  share of one core, not one rendering each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

#: Connections open at once (a Prometheus server needs one per scrape).
MAX_CONNECTIONS: Final = 32
#: Seconds a connection has to send its whole request head.
READ_TIMEOUT: Final = 5.0
#: Seconds to render the answer and hand it to the client.
WRITE_TIMEOUT: Final = 10.0
#: Bytes of a request head (request line and headers): a scrape's is a few hundred.
MAX_HEAD: Final = 8192
#: Seconds between two renderings of the exposition.
SPACING: Final = 0.05
PATH: Final = "/metrics"

#: What a rendering depends on: content type, gzip, metric names (empty: all).
_Key = tuple[str, bool, frozenset[str]]


class _HttpError(Exception):
    """A request answered with an error status and closed."""

    def __init__(self, status: str, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.headers = headers


@dataclass(eq=False)
class _Connection:
    """One client connection and what it is doing."""

    task: asyncio.Task[None]
    writer: asyncio.StreamWriter
    #: Still reading its request head: the connection a newcomer may evict.
    waiting: bool = True

    def drop(self) -> None:
        """Close at once, unsent bytes and all, and stop its handler."""
        self.writer.transport.abort()
        self.task.cancel()


class _Renderer:
    """Renders the exposition on one worker thread, one rendering at a time; a request
    that arrives while one is rendered waits for the next, shared by every request that
    arrives before it starts (so each still sees the counts as of its arrival)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "tensorwire-metrics-render")
        self.lock = asyncio.Lock()
        self.next: dict[_Key, asyncio.Future[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def render(
        self, accept: str, encoding: str, names: frozenset[str]
    ) -> tuple[bytes, str, bool]:
        """The exposition as ``accept`` and ``encoding`` ask: body, content type, gzipped."""
        encoder, content_type = choose_encoder(accept)
        zipped = gzip_accepted(encoding)
        key = (content_type, zipped, names)
        future = self.next.get(key)
        if future is None:
            future = self.next[key] = asyncio.get_running_loop().create_future()
            # Retrieved here, so a rendering whose requests all went away logs nothing.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            task = asyncio.create_task(self._render(key, encoder, future))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        try:
            # Shielded: a request that goes away does not cancel the others' rendering.
            return await asyncio.shield(future), content_type, zipped
        except Exception as exc:  # logged once, by the rendering
            raise _HttpError("500 Internal Server Error", "rendering the metrics failed") from exc

    async def _render(
        self,
        key: _Key,
        encoder: Callable[[CollectorRegistry], bytes],
        future: asyncio.Future[bytes],
    ) -> None:
        async with self.lock:
            del self.next[key]  # requests from now on wait for a rendering of their own
            loop = asyncio.get_running_loop()
            try:
                body = await loop.run_in_executor(self.pool, self._bake, key, encoder)
            except Exception as exc:
                log.exception("metrics: rendering the exposition failed")
                future.set_exception(exc)
            else:
                future.set_result(body)
            await asyncio.sleep(SPACING)

    def _bake(self, key: _Key, encoder: Callable[[CollectorRegistry], bytes]) -> bytes:
        _, zipped, names = key
        registry = self.registry.restricted_registry(names) if names else self.registry
        body = encoder(registry)  # type: ignore[arg-type]
        return gzip.compress(body) if zipped else body


class MetricsListener:
    """Serves ``registry`` over HTTP at ``host:port`` (0: any free port, in ``port``)
    until ``close``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._registry = registry
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        sock = _bind(host, port)
        self.port: int = sock.getsockname()[1]
        #: Open connections, oldest first.
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._loop = asyncio.new_event_loop()
        self._renderer: _Renderer | None = None
        self._server: asyncio.Server | None = None
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(sock, started), name="tensorwire-metrics", daemon=True
        )
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            self._loop.close()
            raise

    def _run(self, sock: socket.socket, started: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._renderer = _Renderer(self._registry)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)
            )
        except BaseException as exc:
            sock.close()
            started.set_exception(exc)
            return
        started.set_result(None)
        self._loop.run_forever()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        if self._renderer is not None:
            self._renderer.pool.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self) -> None:
        assert self._server is not None and self._renderer is not None
        self._server.close()
        tasks = [*self._connections, *self._renderer.tasks]
        for connection in list(self._connections.values()):
            connection.drop()
        for task in self._renderer.tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(task, writer)
        if not self._admit():
            writer.transport.abort()  # every connection is being answered: no room
            return
        self._connections[task] = connection
        try:
            await self._answer(reader, writer, connection)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client left, or was too slow: nothing to answer
        except asyncio.CancelledError:
            # Evicted or closing. Ended quietly: asyncio's streams log a handler task
            # that ends cancelled as an error, and nothing awaits this one but close.
            pass
        finally:
            self._connections.pop(task, None)
            writer.transport.abort()  # no-op once closed cleanly

    def _admit(self) -> bool:
        """Room for one more connection, made by evicting the oldest one still waiting
        for its request if need be."""
        if len(self._connections) < self.max_connections:
            return True
        for task, other in self._connections.items():
            if other.waiting:
                del self._connections[task]
                other.drop()
                return True
        return False

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            head = b""  # past MAX_HEAD
        connection.waiting = False
        async with asyncio.timeout(self.write_timeout):
            try:
                if not head:
                    raise _HttpError(
                        "431 Request Header Fields Too Large", "request head too large"
                    )
                response = await self._respond(head)
            except _HttpError as error:
                body = f"{error}\n".encode()
                headers = (("Content-Type", "text/plain; charset=utf-8"), *error.headers)
                response = _response(error.status, headers, body)
            writer.write(response)
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    async def _respond(self, head: bytes) -> bytes:
        method, target, headers = _parse(head)
        if method not in ("GET", "HEAD"):
            raise _HttpError("405 Method Not Allowed", "use GET", (("Allow", "GET, HEAD"),))
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            raise _HttpError("413 Content Too Large", "request bodies are not accepted")
        url = urlsplit(target)
        if url.path != PATH:
            raise _HttpError("404 Not Found", f"metrics are at {PATH}")
        names = frozenset(parse_qs(url.query).get("name[]", ()))
        assert self._renderer is not None
        body, content_type, zipped = await self._renderer.render(
            headers.get("accept", ""), headers.get("accept-encoding", ""), names
        )
        fields = [("Content-Type", content_type)]
        if zipped:
            fields.append(("Content-Encoding", "gzip"))
        response = _response("200 OK", fields, body)
        return response[: len(response) - len(body)] if method == "HEAD" else response


def _parse(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and headers (names lower-cased) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # blank lines before a request line are allowed
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError("400 Bad Request", "not an HTTP/1 request line")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _HttpError("400 Bad Request", "malformed header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


def _response(status: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to, as
    prometheus_client's server chose (so port 0 is one port, not one per family)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
