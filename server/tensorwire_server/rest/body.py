"""A REST request's body, read within its limits: its declared length checked before a
byte of memory is taken for it, read into one buffer of that length (the one copy out
of the socket's chunks; binary tensors are views of it from then on), each pause
between chunks bounded, a body cut short refused."""

from __future__ import annotations

import asyncio
from typing import Final

import numpy as np
from aiohttp import web

from tensorwire.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
)

#: The encodings a body may come in: none. A compressed body's size says nothing of
#: what it inflates to (a decompression bomb), so none is inflated.
_IDENTITY: Final = ("", "identity")


class BodyError(InvalidArgumentError):
    """A body that cannot be read (with its own HTTP status, not its code's)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: web.BaseRequest, limit: int, pause: float) -> memoryview:
    """The whole body of ``request`` (empty when it has none), refused past ``limit``
    bytes from its Content-Length alone, before it is read; ``pause``: the seconds it
    may send nothing before it is refused (a slow or stalled sender holds a
    connection and a place in the server's budgets)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _IDENTITY:
        raise BodyError(
            f"Content-Encoding {encoding[:40]!r} is not accepted: send the body uncompressed",
            415,
        )
    length = request.content_length
    chunked = request.headers.get("Transfer-Encoding", "").lower() == "chunked"
    if length is None and not chunked:
        return memoryview(b"")
    if length is not None and length > limit:
        raise BodyError(
            f"the request body is {length} bytes, more than the {limit} this server takes "
            "(max_request_bytes and http_json_bytes)",
            413,
        )
    if length is None:
        return await _chunked(request, limit, pause)
    content = request.content
    if content.is_eof() and content.total_bytes == length:
        # All of it arrived with the headers (a small call): the parser's own bytes,
        # no buffer, no copy.
        return memoryview(content.read_nowait(-1))
    # np.empty, not bytearray: pages are not zeroed before the body fills them.
    buffer = np.empty(length, dtype=np.uint8)
    view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
    filled = 0
    while filled < length:
        chunk = await _next(content, pause)
        if not chunk:
            raise BodyError(
                f"the request body ended after {filled} of its {length} bytes (Content-Length)",
                400,
            )
        size = len(chunk)
        view[filled : filled + size] = chunk
        filled += size
    # Read-only from here, as gRPC's request bytes are: the tensors made from it are
    # views, and nothing of the server's may write into a caller's input.
    buffer.flags.writeable = False
    return view.toreadonly()


async def _chunked(request: web.BaseRequest, limit: int, pause: float) -> memoryview:
    """A body sent in chunks, of no declared length: gathered up to ``limit``."""
    gathered = bytearray()
    while True:
        chunk = await _next(request.content, pause)
        if not chunk:
            return memoryview(gathered)
        if len(gathered) + len(chunk) > limit:
            raise BodyError(
                f"the request body is more than the {limit} bytes this server takes "
                "(max_request_bytes and http_json_bytes)",
                413,
            )
        gathered += chunk


async def _next(content: object, pause: float) -> bytes:
    try:
        async with asyncio.timeout(pause):
            return await content.readany()  # type: ignore[attr-defined, no-any-return]
    except TimeoutError:
        raise BodyError(
            f"the request body stopped arriving for {pause:g} s (http_read_timeout)", 408
        ) from None


__all__ = ["BodyError", "DeadlineExceededError", "ResourceExhaustedError", "read_body"]
