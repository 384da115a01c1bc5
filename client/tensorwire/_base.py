"""What Client and AsyncClient share: request building, response decoding, errors.

The twins differ only in how they wait for the transport, so every method is split
into a ``_prepare_*`` (arguments -> encoded request) and a ``_finish_*`` (decoded
response -> result) here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from tensorwire.channel import CHANNEL_OPTIONS
from tensorwire.codec import Encoder, Received, receiver
from tensorwire.dtypes import NAME_BY_WIRE
from tensorwire.errors import TensorwireError, UnavailableError, error_class
from tensorwire.types import DeviceInfo, GradResult, ModelInfo, ServerInfo, TensorSpec
from tensorwire.v1 import tensorwire_pb2 as pb

M = TypeVar("M", bound=Message)
SERVICE: Final = pb.DESCRIPTOR.services_by_name["TensorService"]


class _UseClientDefault:
    """The type of USE_CLIENT_DEFAULT."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: Passed as ``timeout`` (the default), it means "use the client's timeout".
USE_CLIENT_DEFAULT: Final = _UseClientDefault()

Timeout = float | None | _UseClientDefault
Inputs = np.ndarray | Sequence[Any] | Mapping[str, Any]


#: The response message of each TensorService method.
RESPONSES: Final[dict[str, type[Message]]] = {
    "Info": pb.InfoResponse,
    "Infer": pb.InferResponse,
    "Grad": pb.GradResponse,
    "Call": pb.CallResponse,
}


def method_path(name: str) -> str:
    """The gRPC path of a TensorService method."""
    return f"/{SERVICE.full_name}/{name}"


def _named_inputs(inputs: Inputs) -> list[tuple[str, np.ndarray]]:
    if isinstance(inputs, np.ndarray):
        return [("", inputs)]
    if isinstance(inputs, Mapping):
        return [(str(name), np.asarray(value)) for name, value in inputs.items()]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
        return [("", np.asarray(value)) for value in inputs]
    return [("", np.asarray(inputs))]


def _owned(received: Received[Any], tensors: Sequence[pb.NamedTensor]) -> dict[str, np.ndarray]:
    # One copy: the received bytes are gRPC's and immutable; the caller gets its own.
    return {name: np.array(view) for name, view in received.named(tensors, "output")}


def _spec(spec: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        spec.name,
        NAME_BY_WIRE.get(spec.dtype),
        None if spec.any_shape else tuple(spec.shape),
    )


class BaseClient:
    """Target, default timeout and the encode/decode halves of every method."""

    def __init__(self, target: str, *, timeout: float | None = 60.0) -> None:
        self.target = target
        self.timeout = timeout
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed

    @staticmethod
    def _bind_methods(channel: Any) -> dict[str, Any]:
        """Callables for every method on a grpc or grpc.aio channel, with our codec."""
        return {
            name: channel.unary_unary(
                method_path(name),
                request_serializer=None,  # requests arrive encoded
                response_deserializer=receiver(cls),
            )
            for name, cls in RESPONSES.items()
        }

    def _options(self, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [*CHANNEL_OPTIONS, *extra]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.target} is closed")

    def _timeout(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _UseClientDefault) else timeout

    def _error(self, exc: grpc.RpcError) -> TensorwireError:
        # grpc.Call (sync) and grpc.aio.AioRpcError share code() and details() but no base.
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        cls = error_class(code.name)
        if cls is UnavailableError:
            details = f"{self.target}: {details}"
        return cls(details)

    @staticmethod
    def _unwrap(result: Received[M] | TensorwireError) -> Received[M]:
        if isinstance(result, TensorwireError):
            raise result
        return result

    # ------------------------------------------------------------------ Info

    @staticmethod
    def _prepare_info() -> bytes:
        return bytes(pb.InfoRequest().SerializeToString())

    @staticmethod
    def _finish_info(received: Received[pb.InfoResponse]) -> ServerInfo:
        m = received.message
        return ServerInfo(
            server_version=m.server_version,
            torch_version=m.torch_version,
            device=DeviceInfo(
                m.device.name,
                m.device.description,
                m.device.total_memory_bytes,
                m.device.free_memory_bytes,
            ),
            models={
                model.name: ModelInfo(
                    model.name,
                    model.kind,
                    model.description,
                    tuple(_spec(s) for s in model.inputs),
                    tuple(_spec(s) for s in model.outputs),
                    model.variadic,
                    model.parameter_count,
                )
                for model in m.models
            },
            functions={f.name: f.description for f in m.functions},
        )

    # ------------------------------------------------------------------ Infer

    @staticmethod
    def _prepare_infer(model: str, inputs: Inputs, outputs: Sequence[str] | None) -> bytes:
        encoder = Encoder()
        request = pb.InferRequest(model=model, outputs=list(outputs or ()))
        for name, arr in _named_inputs(inputs):
            encoder.named(request.inputs.add(), name, arr)
        return encoder.finish(request)

    @staticmethod
    def _finish_infer(received: Received[pb.InferResponse]) -> dict[str, np.ndarray]:
        return _owned(received, received.message.outputs)

    # ------------------------------------------------------------------ Grad

    @staticmethod
    def _prepare_grad(
        model: str,
        inputs: Inputs,
        wrt: str | Sequence[str] | None,
        grad_outputs: np.ndarray | Mapping[str, Any] | None,
        param_grads: bool,
    ) -> bytes:
        encoder = Encoder()
        request = pb.GradRequest(model=model, param_grads=param_grads, wrt=_names(wrt))
        for name, arr in _named_inputs(inputs):
            encoder.named(request.inputs.add(), name, arr)
        _grad_outputs(encoder, request, grad_outputs)
        return encoder.finish(request)

    @staticmethod
    def _prepare_call_grad(
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        wrt: int | Sequence[int],
        grad_outputs: np.ndarray | Mapping[str, Any] | None,
    ) -> bytes:
        encoder = Encoder()
        positions = [wrt] if isinstance(wrt, int) else list(wrt)
        request = pb.GradRequest(function=function, wrt=[str(int(i)) for i in positions])
        _arguments(encoder, request, args, kwargs)
        _grad_outputs(encoder, request, grad_outputs)
        return encoder.finish(request)

    @staticmethod
    def _finish_grad(received: Received[pb.GradResponse]) -> GradResult:
        m = received.message
        return GradResult(
            outputs=_owned(received, m.outputs),
            grads=_owned(received, m.grads),
            param_grads=_owned(received, m.param_grads),
        )

    # ------------------------------------------------------------------ Call

    @staticmethod
    def _prepare_call(function: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
        encoder = Encoder()
        request = pb.CallRequest(function=function)
        _arguments(encoder, request, args, kwargs)
        return encoder.finish(request)

    @staticmethod
    def _finish_call(received: Received[pb.CallResponse]) -> np.ndarray | tuple[np.ndarray, ...]:
        outputs = tuple(_owned(received, received.message.outputs).values())
        return outputs[0] if len(outputs) == 1 else outputs


def _names(wrt: str | Sequence[str] | None) -> list[str]:
    if wrt is None:
        return []
    return [wrt] if isinstance(wrt, str) else list(wrt)


def _grad_outputs(
    encoder: Encoder, request: pb.GradRequest, grad_outputs: np.ndarray | Mapping[str, Any] | None
) -> None:
    if grad_outputs is None:
        return
    if not isinstance(grad_outputs, Mapping):
        # One array: the vector for the single output, whatever the server names it.
        encoder.named(request.grad_outputs.add(), "", np.asarray(grad_outputs))
        return
    for name, value in grad_outputs.items():
        encoder.named(request.grad_outputs.add(), str(name), np.asarray(value))


def _arguments(
    encoder: Encoder, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    for i, arg in enumerate(args):
        encoder.value(request.args.add(), arg, f"argument {i}")
    for key, arg in kwargs.items():
        encoder.value(request.kwargs[key], arg, f"argument {key!r}")
