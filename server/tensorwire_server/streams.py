"""The streamed methods' handler (InferStream, GradStream, ...): the request's header,
then its payloads as chunks or over the data plane; the response the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from tensorwire.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.codec import Encoder, Received
from tensorwire.wire.streaming import StreamReceiver
from tensorwire_server import rpc
from tensorwire_server.compute import Compute
from tensorwire_server.dataplane import TICKET_SECONDS, DataPlane, Transfer
from tensorwire_server.service import Service


class Answering(Protocol):
    """What the handler needs of the servicer it answers for."""

    service: Service
    chunk_size: int
    data_plane: DataPlane | None

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
            asked = False  # whether the client asked for the data plane

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
                            # The payloads will come over the data plane: a ticket.
                            _check_ask(receiver, asked)
                            asked = True
                            transfer = _issue(servicer, receiver, stager.in_place)
                            yield _ticket(transfer)
                            continue
                        if transfer is not None:
                            # The client could not reach the data port: chunks after all.
                            _withdraw(transfer)
                            transfer = None
                        receiver.take(number, body)
                        limits.stream_time(time.monotonic() - started)
                    if transfer is not None:
                        await _arrival(transfer, rpc.remaining(context))
                request = receiver.finish()
                servicer.admit(request, unary=False)
                # Handed over in a box the worker empties: the executor keeps its
                # arguments a moment after the result is out, and a same-host
                # transfer asks right then whether anything still holds the request.
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
                # Nothing here may hold the request's pages once they are sent: a
                # same-host client reuses each input segment the server no longer maps.
                del encoder, header, payloads
                await asyncio.wrap_future(transfer.sent)
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
                    transfer.release()

    return handle


def _unboxed(answer: Callable[[Received[Any]], Encoder[Any]], box: list[Received[Any]]) -> Any:
    return answer(box.pop())


def _check_ask(receiver: StreamReceiver[Any], asked: bool) -> None:
    """Refuse a request for the data plane anywhere but right after the header."""
    if asked or not receiver.started or receiver.received:
        raise InvalidArgumentError(
            "malformed stream: a data-plane request must follow the header, once"
        )


def _issue(servicer: Answering, receiver: StreamReceiver[Any], in_place: bool) -> Transfer | None:
    """A ticket for the payloads ``receiver`` expects; None: no data plane here."""
    plane = servicer.data_plane
    if plane is None:
        return None
    return plane.issue(receiver, servicer.service.limits.max_stream_seconds, in_place)


def _ticket(transfer: Transfer | None) -> bytes:
    """The response part that hands the client its ticket; without one (no data
    plane), the client sends chunks."""
    if transfer is None:
        return _data_part(pb.DataTransfer())
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


def _withdraw(transfer: Transfer) -> None:
    """Take back an unclaimed ticket before chunks fill the same buffers."""
    if not transfer.revoke():
        raise InvalidArgumentError(
            "malformed stream: chunks for a request whose payloads came over the data plane"
        )


async def _arrival(transfer: Transfer, remaining: float | None) -> None:
    """Wait for the payloads: the ticket claimed within its time, then every byte
    within the call's deadline (``remaining`` seconds; the connection's own timeout
    bounds a stall)."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.wrap_future(transfer.claimed), TICKET_SECONDS)
    except TimeoutError:
        raise DeadlineExceededError(
            f"no data connection presented the ticket within {TICKET_SECONDS:g} s"
        ) from None
    if remaining is not None:
        remaining -= time.monotonic() - began
    try:
        await asyncio.wait_for(asyncio.wrap_future(transfer.arrived), remaining)
    except TimeoutError:
        raise DeadlineExceededError(
            "the deadline passed while the payloads arrived over the data plane"
        ) from None
    except (OSError, ConnectionError) as exc:
        raise UnavailableError(f"the data connection failed: {exc}") from None
