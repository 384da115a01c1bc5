"""The gRPC layer: wire messages <-> engine calls, and one error mapping for every RPC."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import torch

import tensorwire_server
from tensorwire.codec import Encoder, Received, receiver
from tensorwire.dtypes import WIRE_BY_NAME
from tensorwire.errors import InvalidArgumentError, TensorwireError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire_server.engine import Engine, GradOutcome, Named
from tensorwire_server.models import TensorSpec

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TensorService"]


class TensorServicer:
    """Implements tensorwire.v1.TensorService over an Engine; translates only."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def Info(self, request: Received[pb.InfoRequest]) -> bytes:
        engine = self.engine
        device = engine.describe_device()
        response = pb.InfoResponse(
            server_version=tensorwire_server.__version__,
            torch_version=torch.__version__,
            device=pb.DeviceInfo(
                name=device.name,
                description=device.description,
                total_memory_bytes=device.total_memory,
                free_memory_bytes=device.free_memory,
            ),
        )
        for name in sorted(engine.models):
            model = engine.models[name]
            response.models.add(
                name=name,
                kind=model.kind,
                description=model.description,
                inputs=[_spec(s) for s in model.inputs],
                outputs=[_spec(s) for s in model.outputs],
                variadic=model.variadic,
                parameter_count=model.parameter_count(),
            )
        for name in sorted(engine.functions):
            response.functions.add(name=name, description=engine.functions[name].description)
        return bytes(response.SerializeToString())

    def Infer(self, request: Received[pb.InferRequest]) -> bytes:
        message = request.message
        outputs = self.engine.infer(
            message.model, request.named(message.inputs, "input"), list(message.outputs)
        )
        encoder = Encoder()
        response = pb.InferResponse(model=message.model)
        _fill(encoder, response.outputs, outputs)
        return encoder.finish(response)

    def Grad(self, request: Received[pb.GradRequest]) -> bytes:
        message = request.message
        grad_outputs = request.named(message.grad_outputs, "grad_outputs")
        outcome: GradOutcome
        if message.WhichOneof("target") == "function":
            if message.param_grads:
                raise InvalidArgumentError(
                    "param_grads needs a model; functions have no parameters"
                )
            args, kwargs = request.arguments(message.args, message.kwargs)
            outcome = self.engine.grad_function(
                message.function, args, kwargs, list(message.wrt), grad_outputs
            )
        else:
            outcome = self.engine.grad_model(
                message.model,
                request.named(message.inputs, "input"),
                list(message.wrt),
                grad_outputs,
                message.param_grads,
            )
        encoder = Encoder()
        response = pb.GradResponse()
        _fill(encoder, response.outputs, outcome.outputs)
        _fill(encoder, response.grads, outcome.grads)
        _fill(encoder, response.param_grads, outcome.param_grads)
        return encoder.finish(response)

    def Call(self, request: Received[pb.CallRequest]) -> bytes:
        message = request.message
        args, kwargs = request.arguments(message.args, message.kwargs)
        outputs = self.engine.call(message.function, args, kwargs)
        encoder = Encoder()
        response = pb.CallResponse()
        _fill(encoder, response.outputs, outputs)
        return encoder.finish(response)


def _fill(encoder: Encoder, field: Any, tensors: Named) -> None:
    for name, arr in tensors:
        encoder.named(field.add(), name, arr)


def _spec(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=WIRE_BY_NAME[spec.dtype] if spec.dtype else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
        shape=spec.shape or (),
        any_shape=spec.shape is None,
    )


def _guarded(method: str, behavior: Callable[[Any], bytes]) -> Callable[[Any, Any], bytes]:
    """The one error mapping: tensorwire errors become their status with their message;
    anything else is a server bug, logged with its traceback and answered INTERNAL."""

    def handle(request: Any, context: grpc.ServicerContext) -> bytes:
        try:
            if isinstance(request, TensorwireError):
                raise request
            return behavior(request)
        except TensorwireError as exc:
            # The caller's mistake, not the server's: debug level, no traceback.
            log.debug("%s: %s %s", method, exc.code, exc.message)
            context.abort(grpc.StatusCode[exc.code], exc.message)
        except Exception:
            log.exception("%s failed with a server error", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal server error")
        raise AssertionError("unreachable")  # context.abort always raises

    return handle


def tensor_service_handler(servicer: TensorServicer) -> grpc.GenericRpcHandler[Any, Any]:
    """Every TensorService method, named from the service descriptor, with our codec."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
        cls = getattr(pb, request_class.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(f"{SERVICE.name}.{method.name}", getattr(servicer, method.name)),
            request_deserializer=receiver(cls),
            response_serializer=bytes,  # the servicer already encoded the response
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
