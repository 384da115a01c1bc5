"""The v2 protocol's gRPC service, inference.GRPCInferenceService: wire messages ->
calls on the service core tensorwire.v1 shares -> wire messages, with tensorwire's
error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from tensorwire.errors import TensorwireError
from tensorwire_server import calls
from tensorwire_server.kserve import codec
from tensorwire_server.kserve.protocol import (
    CUDA_SHARED_MEMORY,
    EXTENSIONS,
    OFF_LOOP,
    SERVICE,
    SHARED_MEMORY,
    InferenceServicer,
    version_number,
)
from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb
from tensorwire_server.transport import rpc
from tensorwire_server.transport.executor import Compute

__all__ = [
    "CUDA_SHARED_MEMORY",
    "EXTENSIONS",
    "SERVICE",
    "SHARED_MEMORY",
    "InferenceServicer",
    "inference_service_handler",
    "version_number",
]

log = logging.getLogger(__name__)


def stream_deadline(servicer: InferenceServicer, context: rpc.Context) -> float:
    """When a streamed request must have left the model's queue: the call's deadline,
    else the servicer's default_deadline from its arrival."""
    remaining = rpc.remaining(context)
    return time.monotonic() + (servicer.default_deadline if remaining is None else remaining)


class _IdleCutoff:
    """Ends a stream that has waited ``seconds`` for its next request with CANCELLED: an
    idle client must not hold the stream forever. A request being answered is not
    idleness; a client that stops reading the answers is idle too."""

    def __init__(self, seconds: float, context: rpc.Context) -> None:
        self.seconds = seconds
        self.context = context
        self.last = time.monotonic()
        self.busy = False
        self._watch = asyncio.ensure_future(self._watching())

    def touch(self, busy: bool) -> None:
        """A request arrived (busy) or its answer went out (idle again)."""
        self.last = time.monotonic()
        self.busy = busy

    def close(self) -> None:
        """The stream ended: stop watching."""
        self._watch.cancel()

    async def _watching(self) -> None:
        while True:
            idle = time.monotonic() - self.last
            if self.busy or idle < self.seconds:
                await asyncio.sleep(self.seconds if self.busy else self.seconds - idle)
                continue
            log.info("ModelStreamInfer: no request for %.3g s; closing the stream", idle)
            with contextlib.suppress(grpc.aio.AbortError):  # the status is sent: done
                await rpc.abort(
                    self.context, grpc.StatusCode.CANCELLED, "the stream was idle too long"
                )
            return


def _infer_unary(method: str, servicer: InferenceServicer, compute: Compute) -> rpc.Unary[bytes]:
    def finish(answer: codec.Answer) -> bytes:
        rpc.one_message(answer.payload_bytes, servicer.unary_limit, "tensorwire.v1's InferStream")
        return answer.finish()

    async def infer(request: codec.InferRequest | TensorwireError, context: rpc.Context) -> bytes:
        async with rpc.statuses(method, context):
            if isinstance(request, TensorwireError):
                raise request
            call = calls.current()
            deadline = call.deadline if call is not None else None
            return await servicer.infer_placed(request, deadline, compute, finish)
        raise AssertionError("unreachable")  # statuses aborts, and abort raises

    return infer


def _infer_stream(method: str, servicer: InferenceServicer, compute: Compute) -> rpc.Streaming:
    def answer(request: codec.InferRequest, deadline: float) -> bytes:
        return servicer.infer(request, deadline).streamed()

    async def handle(
        requests: AsyncIterator[codec.InferRequest | TensorwireError], context: rpc.Context
    ) -> AsyncIterator[bytes]:
        cutoff = _IdleCutoff(servicer.service.limits.max_stream_seconds, context)
        try:
            async for request in requests:
                cutoff.touch(busy=True)
                try:
                    if isinstance(request, TensorwireError):
                        raise request
                    deadline = stream_deadline(servicer, context)
                    if servicer.batched(request):
                        found = await servicer.infer_async(request, deadline, compute.run)
                        response = found.streamed()
                    else:
                        response = await compute.run(answer, request, deadline)
                except TensorwireError as exc:
                    # As Triton does: the request's error in its response; the stream goes on.
                    log.debug("%s: %s %s", method, exc.code, exc.message)
                    response = codec.stream_error(rpc.clip(exc.message), request)
                except Exception:
                    log.exception("%s failed with a server error", method)
                    response = codec.stream_error(f"{method}: internal server error", request)
                cutoff.touch(busy=False)  # a client that stops reading is idle too
                yield response
        except asyncio.CancelledError as exc:
            rpc.cancelled(method, exc)
            raise
        finally:
            cutoff.close()

    return handle


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def inference_service_handler(
    servicer: InferenceServicer, compute: Compute
) -> grpc.GenericRpcHandler[Any, Any]:
    """Every method of inference.GRPCInferenceService, named from its descriptor."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        name = f"{SERVICE.name}.{method.name}"
        if method.name == "ModelInfer":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _infer_unary(name, servicer, compute),
                request_deserializer=codec.receive_infer,
                response_serializer=bytes,  # already serialized, raw contents spliced in
            )
        elif method.name == "ModelStreamInfer":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _infer_stream(name, servicer, compute),
                request_deserializer=codec.receive_infer,
                response_serializer=bytes,
            )
        else:
            # Loading a model reads files and places weights: off the loop. The rest
            # only read the server's state.
            where = compute if method.name in OFF_LOOP else None
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                rpc.unary(name, getattr(servicer, method.name), where),
                request_deserializer=codec.parse(getattr(pb, method.input_type.name)),
                response_serializer=_serialize,
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
