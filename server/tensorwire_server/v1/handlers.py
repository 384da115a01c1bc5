"""TensorService's gRPC method handlers, named from its service descriptor: where each
unary method runs (on the event loop, on a Compute thread, or placed by its cost), a
batched model's Infer waiting for its batch on the loop, and the streamed methods
through ``streams``."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final

import grpc
import grpc.aio

from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Encoder, Received, receiver
from tensorwire_server.transport import rpc
from tensorwire_server.transport.executor import Compute
from tensorwire_server.v1.servicer import TensorServicer
from tensorwire_server.v1.streams import streamed

SERVICE: Final = pb.DESCRIPTOR.services_by_name["TensorService"]
#: The methods that only read or name state already there: answered on the event loop.
#: Everything else computes, copies or loads, through Compute.
ON_THE_LOOP: Final = frozenset(
    {
        "Info",
        "ModelStatistics",
        "OpenSession",
        "DescribeSession",
        "Free",
        "CloseSession",
        "OpenLane",
    }
)
#: The methods whose work Compute places by its measured cost (on the loop when cheap);
#: the rest always run on a thread.
PLACED: Final = frozenset({"Infer", "Grad", "Call"})


def _unary(
    method: str,
    behavior: Callable[[Received[Any]], Encoder[Any]],
    servicer: TensorServicer,
    compute: Compute | None,
) -> rpc.Unary[bytes]:
    short = method.rpartition(".")[2]

    def prepare(request: Received[Any]) -> Hashable | None:
        servicer.admit(request, unary=True)
        return servicer.kind(short, request) if short in PLACED else None

    def finish(encoder: Encoder[Any]) -> bytes:
        payload_bytes = encoder.payload_bytes  # a sum over its tensors: once
        servicer.answered(encoder, payload_bytes)
        rpc.one_message(payload_bytes, servicer.unary_limit, f"{method}Stream")
        return encoder.finish()

    def answer(request: Received[Any]) -> bytes:
        return finish(behavior(request))

    handle = rpc.unary(method, answer, compute, prepare)
    if short != "Infer" or compute is None:
        return handle

    async def infer(request: Any, context: rpc.Context) -> bytes:
        # A batched model's requests wait for their batch on the loop, not on threads.
        try:  # rpc.statuses, written out
            if isinstance(request, Received):
                if servicer.batched(request):
                    servicer.admit(request, unary=True)
                    return finish(await servicer.infer_batched(request, compute.run))
                # ``handle``'s work, without its coroutine: the same mapping here.
                return await compute.run(answer, request, kind=prepare(request))
        except grpc.aio.AbortError:
            raise  # the call already has its status
        except Exception as exc:
            await rpc.failed(method, context, exc)
        return await handle(request, context)

    return infer


def tensor_service_handler(
    servicer: TensorServicer, compute: Compute
) -> grpc.GenericRpcHandler[Any, Any]:
    """Every TensorService method, named from the service descriptor, with our codec."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        name = f"{SERVICE.name}.{method.name}"
        if method.client_streaming:
            # InferStream streams InferRequestPart, whose header is an InferRequest.
            request_class = getattr(pb, method.input_type.name.removesuffix("Part"))
            behavior = getattr(servicer, method.name.removesuffix("Stream"))
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                streamed(name, request_class, behavior, servicer, compute)
            )
        else:
            where = None if method.name in ON_THE_LOOP else compute
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(name, getattr(servicer, method.name), servicer, where),
                # A large request's tensors are counted before protobuf parses it.
                request_deserializer=receiver(
                    getattr(pb, method.input_type.name), servicer.service.limits.tensor_count
                ),
                response_serializer=bytes,  # the servicer already encoded the response
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
