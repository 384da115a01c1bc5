"""AsyncTransport: the transport of AsyncClient, on grpc.aio; the data port's
blocking work runs on a thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import grpc
import grpc.aio

from tensorwire._flow import Send
from tensorwire._transport.calls import CallState, Retry
from tensorwire._transport.lane_aio import AsyncLane, AsyncLaneMethod
from tensorwire._transport.ticket_exchange import Work
from tensorwire._transport.transport import Transport
from tensorwire.wire.codec import Received


class AsyncTransport(Transport):
    """Makes each call with grpc.aio's stubs, backs off with ``asyncio.sleep``, and
    runs the data port's work on a thread."""

    _GRPC: ClassVar[Any] = grpc.aio
    _LANE: ClassVar[Any] = AsyncLane
    _LANE_METHOD: ClassVar[Any] = AsyncLaneMethod

    async def close(self) -> None:
        """See ``BlockingTransport.close``."""
        for channel in self._release():
            await channel.close(grace=None)

    async def invoke(self, send: Send) -> Received[Any]:
        """See ``BlockingTransport.invoke``."""
        call = self._begin(send)
        while True:
            try:
                return await self._attempt(call)
            except Retry as retry:
                await asyncio.sleep(retry.delay)

    async def _attempt(self, call: CallState) -> Received[Any]:
        self._next_attempt(call)
        if not call.streamed:
            try:
                result = await call.methods[call.method](
                    call.encoder.finish(), timeout=call.remaining(), metadata=call.metadata
                )
            except grpc.RpcError as exc:
                self._unary_failed(call, exc)  # returns only to ask again as a stream
            else:
                return self._unary_done(call, result)
        return await self._stream(call)

    async def _stream(self, call: CallState) -> Received[Any]:
        """See ``BlockingTransport._stream``."""
        chunked: asyncio.Queue[bool] = asyncio.Queue()
        exchange = self._exchange(call, chunked.put_nowait)

        async def requests() -> AsyncIterator[bytes]:
            for part in exchange.opening:
                yield part
            if exchange.asks and await chunked.get():
                for chunk in exchange.chunks:
                    yield chunk

        rpc = exchange.methods[exchange.method](
            requests(), timeout=call.remaining(), metadata=call.metadata
        )
        try:
            async for raw in rpc:
                work = exchange.received(raw)
                if work is not None:
                    exchange.done(await _on_thread(work, call.remaining()))
            return exchange.finish()
        except BaseException as exc:
            exchange.abandon()
            rpc.cancel()  # whatever went wrong, stop the server's work too
            self._stream_failed(call, exc)


async def _on_thread(work: Work, timeout: float | None) -> Any:
    """Run ``work`` on a thread. Cancelled meanwhile, the thread runs on: what it ends
    with is abandoned (a connection it holds is closed)."""
    running = asyncio.ensure_future(asyncio.to_thread(work, timeout))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        running.add_done_callback(lambda done: _abandon(work, done))
        raise


def _abandon(work: Work, done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is None:
        work.abandoned(done.result())
