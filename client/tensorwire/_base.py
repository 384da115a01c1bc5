"""What Client and AsyncClient share: request building, response decoding, errors.

The twins differ only in how they wait for the transport, so every method is split
into a ``_prepare_*`` (arguments -> request encoder) and a ``_finish_*`` (decoded
response -> result) here, and the choice between the unary and the streaming path
(``_wants_stream``) is made here once for both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from tensorwire import streaming
from tensorwire.channel import CHANNEL_OPTIONS
from tensorwire.codec import Encoder, Received, receiver
from tensorwire.dtypes import NAME_BY_WIRE
from tensorwire.errors import OutOfRangeError, TensorwireError, UnavailableError, error_class
from tensorwire.streaming import DEFAULT_CHUNK_SIZE, Advance, StreamReceiver
from tensorwire.types import (
    DeviceInfo,
    GradResult,
    ModelInfo,
    Progress,
    ProgressCallback,
    ServerInfo,
    TensorSpec,
)
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


#: The methods that carry tensors; each has a ``<name>Stream`` twin for large messages.
STREAMED: Final = ("Infer", "Grad", "Call")

#: Requests with at least this many payload bytes travel as a stream. Measured on
#: loopback (docs/performance.md): below it the unary path's lower setup cost wins.
DEFAULT_STREAM_THRESHOLD: Final = 2 << 20


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
    arrays = received.named(tensors, "output")
    if received.owned:  # a stream's buffers: already private and writable
        return dict(arrays)
    # One copy: the received bytes are gRPC's and immutable; the caller gets its own.
    return {name: np.array(view) for name, view in arrays}


class _Reporter:
    """Turns byte counts into Progress calls, and keeps the callback's own exception
    so that it, not the cancellation it causes, is what the caller sees."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.error: BaseException | None = None

    def stage(self, stage: Literal["upload", "download"]) -> Advance | None:
        callback = self.callback
        if callback is None:
            return None

        def advance(done: int, total: int) -> None:
            try:
                callback(Progress(stage, done, total))
            except BaseException as exc:
                self.error = exc
                raise

        return advance

    def whole(self, encoder: Encoder[Any], received: Received[Any]) -> None:
        """Report a unary call, whose bytes move in one piece each way."""
        if self.callback is not None:
            sizes = {"upload": encoder.payload_bytes, "download": received.payload_bytes}
            for stage, size in sizes.items():
                self.callback(Progress(stage, 0, size))  # type: ignore[arg-type]
                self.callback(Progress(stage, size, size))  # type: ignore[arg-type]


def _spec(spec: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        spec.name,
        NAME_BY_WIRE.get(spec.dtype),
        None if spec.any_shape else tuple(spec.shape),
    )


class BaseClient:
    """Target, default timeout and the encode/decode halves of every method."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of bytes, not {chunk_size}")
        self.target = target
        self.timeout = timeout
        self.stream_threshold = stream_threshold
        self.chunk_size = chunk_size
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed

    @staticmethod
    def _bind_methods(channel: Any) -> dict[str, Any]:
        """Callables for every method on a grpc or grpc.aio channel, with our codec:
        requests arrive encoded, and stream parts stay raw for a StreamReceiver."""
        methods = {
            name: channel.unary_unary(method_path(name), response_deserializer=receiver(cls))
            for name, cls in RESPONSES.items()
        }
        for name in STREAMED:
            methods[f"{name}Stream"] = channel.stream_stream(method_path(f"{name}Stream"))
        return methods

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.target} is closed")

    def _timeout(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _UseClientDefault) else timeout

    def _wants_stream(self, encoder: Encoder[Any]) -> bool:
        return encoder.payload_bytes >= self.stream_threshold

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        # A unary call refused as too large is asked again as a stream, within the
        # time the caller gave the whole call.
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    @staticmethod
    def _open_channel(
        api: Any,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> Any:
        """A channel from ``api`` (grpc or grpc.aio, which share these two calls)."""
        opts = [*CHANNEL_OPTIONS, *options]
        if credentials is not None:
            return api.secure_channel(target, credentials, options=opts)
        return api.insecure_channel(target, options=opts)

    def _fetch_again(self, method: str, exc: grpc.RpcError) -> TensorwireError | None:
        """The error to raise for a failed unary call, or None when the response was
        only too large for one message and the call should be made as a stream."""
        error = self._error(exc)
        if isinstance(error, OutOfRangeError) and method in STREAMED:
            return None
        return error

    def _stream_failure(self, exc: BaseException, reporter: _Reporter) -> BaseException:
        """What a streamed call that failed with ``exc`` raises."""
        if reporter.error is not None and reporter.error is not exc:
            # The progress callback raised while gRPC was taking the upload, which
            # cancelled the call: the callback's error is the one to report.
            return reporter.error
        if isinstance(exc, grpc.RpcError):
            return self._error(exc)
        return exc

    def _stream_call(
        self, method: str, encoder: Encoder[Any], reporter: _Reporter
    ) -> tuple[Any, StreamReceiver[Any]]:
        """The request parts of a streamed call and the receiver for its response."""
        parts = streaming.parts(encoder, self.chunk_size, reporter.stage("upload"))
        return parts, StreamReceiver(RESPONSES[method], advance=reporter.stage("download"))

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
    def _prepare_info() -> Encoder[pb.InfoRequest]:
        return Encoder(pb.InfoRequest())

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
    def _prepare_infer(
        model: str, inputs: Inputs, outputs: Sequence[str] | None
    ) -> Encoder[pb.InferRequest]:
        encoder = Encoder(pb.InferRequest(model=model, outputs=list(outputs or ())))
        for name, arr in _named_inputs(inputs):
            encoder.named(encoder.message.inputs.add(), name, arr)
        return encoder

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
    ) -> Encoder[pb.GradRequest]:
        encoder = Encoder(pb.GradRequest(model=model, param_grads=param_grads, wrt=_names(wrt)))
        for name, arr in _named_inputs(inputs):
            encoder.named(encoder.message.inputs.add(), name, arr)
        _grad_outputs(encoder, grad_outputs)
        return encoder

    @staticmethod
    def _prepare_call_grad(
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        wrt: int | Sequence[int],
        grad_outputs: np.ndarray | Mapping[str, Any] | None,
    ) -> Encoder[pb.GradRequest]:
        positions = [wrt] if isinstance(wrt, int) else list(wrt)
        encoder = Encoder(pb.GradRequest(function=function, wrt=[str(int(i)) for i in positions]))
        _arguments(encoder, args, kwargs)
        _grad_outputs(encoder, grad_outputs)
        return encoder

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
    def _prepare_call(
        function: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Encoder[pb.CallRequest]:
        encoder = Encoder(pb.CallRequest(function=function))
        _arguments(encoder, args, kwargs)
        return encoder

    @staticmethod
    def _finish_call(received: Received[pb.CallResponse]) -> np.ndarray | tuple[np.ndarray, ...]:
        outputs = tuple(_owned(received, received.message.outputs).values())
        return outputs[0] if len(outputs) == 1 else outputs


def _names(wrt: str | Sequence[str] | None) -> list[str]:
    if wrt is None:
        return []
    return [wrt] if isinstance(wrt, str) else list(wrt)


def _grad_outputs(
    encoder: Encoder[pb.GradRequest], grad_outputs: np.ndarray | Mapping[str, Any] | None
) -> None:
    request = encoder.message
    if grad_outputs is None:
        return
    if not isinstance(grad_outputs, Mapping):
        # One array: the vector for the single output, whatever the server names it.
        encoder.named(request.grad_outputs.add(), "", np.asarray(grad_outputs))
        return
    for name, value in grad_outputs.items():
        encoder.named(request.grad_outputs.add(), str(name), np.asarray(value))


def _arguments(encoder: Encoder[Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    request = encoder.message
    for i, arg in enumerate(args):
        encoder.value(request.args.add(), arg, f"argument {i}")
    for key, arg in kwargs.items():
        encoder.value(request.kwargs[key], arg, f"argument {key!r}")
