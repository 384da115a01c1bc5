"""The streamed methods' handler (InferStream, GradStream, ...): the request's header,
then its payloads as chunks or over the data port; the response the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, Final, Protocol

import grpc
from google.protobuf.message import Message

from tensorwire.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    TensorwireError,
    UnavailableError,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.codec import Encoder, Received
from tensorwire.wire.streaming import StreamReceiver
from tensorwire_server import calls
from tensorwire_server.core.service import Service
from tensorwire_server.dataport.listener import TICKET_SECONDS, DataPort, Transfer
from tensorwire_server.transport import rpc
from tensorwire_server.transport.executor import Compute


class Answering(Protocol):
    """What the handler needs of the servicer it answers for."""

    service: Service
    chunk_size: int
    dataport: DataPort | None

    def admit(self, request: Received[Any], unary: bool) -> None: ...

    def answered(self, response: Encoder[Any]) -> None: ...


def streamed(
    method: str,
    request_class: type[Message],
    behavior: Callable[[Received[Any]], Encoder[Any]],
    servicer: Answering,
    compute: Compute,
) -> rpc.Streaming:
    async def handle(requests: AsyncIterator[bytes], context: rpc.Context) -> AsyncIterator[bytes]:
        async with rpc.statuses(method, context):
            limits = servicer.service.limits
            stager = servicer.service.stager()
            receiver = StreamReceiver(request_class, stager.allocate, landed=stager.landed)
            receiver.count = limits.tensor_count  # refused from the header
            transfer: Transfer | None = None
            asked = False  # whether the client asked for the data port

            def answer(request: Received[Any]) -> Encoder[Any]:
                with stager.using():
                    return behavior(request)

            started = time.monotonic()
            try:
                # A client that stops sending holds the request's buffers: a second
                # past the limit (a part arriving late gets DEADLINE_EXCEEDED), cut it.
                async with asyncio.timeout(limits.max_stream_seconds + 1):
                    async for raw in requests:
                        number, body = framing.split_part(raw)
                        if number == framing.PART_DATA:
                            # The payloads will come over the data port: a ticket.
                            _check_ask(receiver, asked)
                            asked = True
                            transfer = _issue(servicer, receiver, stager.in_place)
                            yield _ticket(servicer.dataport, transfer)
                            continue
                        if transfer is not None:
                            # The client could not reach the data port: chunks after all.
                            await _withdraw(transfer)
                            transfer = None
                        receiver.take(number, body)
                        limits.stream_time(time.monotonic() - started)
                    if transfer is not None:
                        await _arrival(transfer, rpc.remaining(context))
                request = receiver.finish()
                servicer.admit(request, unary=False)
                # Handed over in a box the worker empties: the executor keeps its
                # arguments a moment after the result is out, and the request's
                # buffers should go back to the warm pool as soon as nothing uses them.
                box = [request]
                del request  # from here on the buffers live only through the outputs
                encoder = await compute.run(_unboxed, answer, box)
                servicer.answered(encoder)
                if transfer is None:
                    for part in streaming.parts(encoder, servicer.chunk_size):
                        yield part
                    return
                # The response's header over gRPC, its payloads on the data connection.
                header, payloads = encoder.header()
                yield streaming.header_part(header)
                announce = pb.DataTransfer(payload_bytes=encoder.payload_bytes)
                yield _data_part(announce)
                transfer.answer(payloads)
                del encoder, header, payloads  # the response's memory goes once it is sent
                failed = await _settled(transfer.sent)
                _raise(failed)  # the client went mid-response, or refused a segment
            except TimeoutError:
                await rpc.abort(
                    context,
                    grpc.StatusCode.CANCELLED,
                    f"the request stream stalled: it had not ended {limits.max_stream_seconds:g}"
                    " s after it began",
                )
            except asyncio.CancelledError as exc:
                rpc.cancelled(method, exc)  # the client went: let go of the receiver's frame
                raise
            finally:
                receiver.close()  # on success `request` holds the buffers, and only it
                stager.close()
                if transfer is not None:
                    # Unanswered (the call failed): the connection closes, the client
                    # drops it; an unclaimed ticket lapses now.
                    transfer.abandon()
                    transfer.revoke()

    return handle


def _unboxed(answer: Callable[[Received[Any]], Encoder[Any]], box: list[Received[Any]]) -> Any:
    return answer(box.pop())


def _check_ask(receiver: StreamReceiver[Any], asked: bool) -> None:
    """Refuse a request for the data port anywhere but right after the header."""
    if asked or not receiver.started or receiver.received:
        raise InvalidArgumentError(
            "malformed stream: a data-plane request must follow the header, once"
        )


def _issue(servicer: Answering, receiver: StreamReceiver[Any], in_place: bool) -> Transfer | None:
    """A ticket for the payloads ``receiver`` expects, in the caller's name (its
    token's: the data port bounds the transfers each caller holds); None: no data
    plane here, or none free for this caller now."""
    plane = servicer.dataport
    if plane is None:
        return None
    call = calls.current()
    caller = "" if call is None else call.caller
    limit = servicer.service.limits.max_stream_seconds
    return plane.issue(receiver, limit, in_place, caller)


def _ticket(plane: DataPort | None, transfer: Transfer | None) -> bytes:
    """The response part that hands the client its ticket. Without one, the client
    sends chunks: for this call only when the part names the data port (the data
    plane is busy), for a while when it does not (this server has none)."""
    if transfer is None:
        port = 0 if plane is None else plane.port
        return _data_part(pb.DataTransfer(port=port))
    return _data_part(
        pb.DataTransfer(
            ticket=transfer.ticket,
            port=transfer.plane.port,
            payload_bytes=transfer.receiver.total,
            expires_in_seconds=TICKET_SECONDS,
            local_socket=transfer.plane.local_name or "",
        )
    )


def _data_part(transfer: pb.DataTransfer) -> bytes:
    body = transfer.SerializeToString()
    return framing.part(framing.PART_DATA, [body], len(body))


async def _withdraw(transfer: Transfer) -> None:
    """Take back an unclaimed ticket before chunks fill the same buffers. A client
    whose data connection closed before the server accepted the ticket sends chunks;
    when the server had claimed it and failed (a same-host segment it refused, a
    connection the client gave up on), the call fails with that error."""
    if transfer.revoke():
        return
    failed = await _settled(transfer.arrived, TICKET_SECONDS)
    if failed is not _PENDING:
        _raise(failed)
    raise InvalidArgumentError(
        "malformed stream: chunks for a request whose payloads came over the data port"
    )


async def _arrival(transfer: Transfer, remaining: float | None) -> None:
    """Wait for the payloads: the ticket claimed within its time, then every byte
    within the call's deadline (``remaining`` seconds; the connection's own timeout
    bounds a stall)."""
    began = time.monotonic()
    if await _settled(transfer.claimed, TICKET_SECONDS) is _PENDING:
        raise DeadlineExceededError(
            f"no data connection presented the ticket within {TICKET_SECONDS:g} s"
        )
    if remaining is not None:
        remaining -= time.monotonic() - began
    failed = await _settled(transfer.arrived, remaining)
    if failed is _PENDING:
        raise DeadlineExceededError(
            "the deadline passed while the payloads arrived over the data port"
        )
    _raise(failed)


def _raise(failed: BaseException | None) -> None:
    """Fail the call with what failed its transfer (nothing: None)."""
    if isinstance(failed, (OSError, ConnectionError)):
        raise UnavailableError(f"the data connection failed: {failed}")
    if isinstance(failed, TensorwireError):
        raise type(failed)(failed.message)  # a copy, for the reason _settled gives
    if failed is not None:
        raise failed


#: What ``_settled`` answers for a future still pending when its time ran out.
_PENDING: Final = TimeoutError()


async def _settled(future: Future[None], timeout: float | None = None) -> BaseException | None:
    """The error ``future`` ended with (None: none), or _PENDING after ``timeout``
    seconds (then it is cancelled). Its error is returned, not raised: raised here,
    it would take this handler's frames into its traceback, and the transfer that
    holds it (a local of those frames) would wait for a garbage collection to go."""
    waited = asyncio.wrap_future(future)
    try:
        await asyncio.wait([waited], timeout=timeout)
    finally:
        # Still pending: cancelled, and ``future`` with it (the connection's thread
        # lets go); done: its error marked retrieved, even when this task was
        # cancelled meanwhile, so that asyncio does not log it.
        if not waited.cancel() and not waited.cancelled():
            waited.exception()
    if waited.cancelled():
        return _PENDING
    return waited.exception()
