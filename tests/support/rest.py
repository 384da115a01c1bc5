"""The REST tests' servers and plain HTTP: a server with its REST port on 127.0.0.1:0,
and requests sent as curl sends them (http.client, one connection each)."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tensorwire_server.server import TensorwireServer
from tensorwire_server.settings import Settings


@contextmanager
def rest_server(engine: Any, **settings: Any) -> Iterator[TensorwireServer]:
    """A started server on ``engine`` with REST on a free loopback port."""
    server = TensorwireServer(
        Settings(port=0, http_port=0, device=str(engine.device), **settings), engine
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(None)


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 30,
) -> Reply:
    """One request as curl makes it (Host, a Content-Length for a body, then close)."""
    if tls is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=timeout
        )
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def infer_body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()
