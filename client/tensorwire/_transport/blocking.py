"""BlockingTransport: the transport of Client, on grpc, waiting in place."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import grpc

from tensorwire._flow import Send
from tensorwire._transport.calls import CallState, Retry
from tensorwire._transport.transport import Transport
from tensorwire.wire.codec import Received


class BlockingTransport(Transport):
    """Makes each call with grpc's blocking stubs, backs off with ``time.sleep``, and
    does the data port's work on the calling thread."""

    _GRPC: ClassVar[Any] = grpc

    def close(self) -> None:
        """Close every channel and data connection; calls made afterwards raise
        RuntimeError."""
        for channel in self._release():
            channel.close()

    def invoke(self, send: Send) -> Received[Any]:
        """Make the call ``send`` describes, attempt after attempt, to its answer."""
        call = self._begin(send)
        while True:
            try:
                return self._attempt(call)
            except Retry as retry:
                time.sleep(retry.delay)

    def _attempt(self, call: CallState) -> Received[Any]:
        self._next_attempt(call)
        if not call.streamed:
            try:
                result = call.methods[call.method](
                    call.encoder.finish(), timeout=call.remaining(), metadata=call.metadata
                )
            except grpc.RpcError as exc:
                self._unary_failed(call, exc)  # returns only to ask again as a stream
            else:
                return self._unary_done(call, result)
        return self._stream(call)

    def _stream(self, call: CallState) -> Received[Any]:
        """A streamed attempt: its exchange (see TicketExchange) driven to its end."""
        chunked: queue.SimpleQueue[bool] = queue.SimpleQueue()
        exchange = self._exchange(call, chunked.put_nowait)

        def requests() -> Iterator[bytes]:
            yield from exchange.opening
            if exchange.asks and chunked.get():
                yield from exchange.chunks

        rpc = exchange.methods[exchange.method](
            requests(), timeout=call.remaining(), metadata=call.metadata
        )
        try:
            for raw in rpc:
                work = exchange.received(raw)
                if work is not None:
                    exchange.done(work(call.remaining()))
            return exchange.finish()
        except BaseException as exc:
            exchange.abandon()
            rpc.cancel()  # whatever went wrong, stop the server's work too
            self._stream_failed(call, exc)
