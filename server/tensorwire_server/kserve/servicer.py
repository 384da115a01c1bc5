"""The v2 protocol's gRPC service, inference.GRPCInferenceService: translates each RPC
to tensorwire's engine, registry and model control, with tensorwire's error mapping."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import grpc
from google.protobuf.message import Message

import tensorwire_server
from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    TensorwireError,
    shown,
)
from tensorwire_server import observe
from tensorwire_server.engine import Engine
from tensorwire_server.gate import Lifecycle
from tensorwire_server.kserve import codec, describe
from tensorwire_server.kserve import grpc_service_pb2 as pb
from tensorwire_server.loading import ModelControl
from tensorwire_server.registry import ModelEntry, ServedVersion
from tensorwire_server.repository import ConfigError, model_names
from tensorwire_server.servicer import TensorServicer, clip, statuses

log = logging.getLogger(__name__)

SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
#: The protocol extensions ServerMetadata reports.
EXTENSIONS: Final = ("model_configuration", "model_repository", "statistics")
_CENTURY: Final = 100 * 365 * 86400.0
_MAX_VERSION_DIGITS: Final = 18


def version_number(text: str) -> int:
    """A v2 version string as tensorwire's number: "" is 0, the newest serving;
    INVALID_ARGUMENT for anything but a positive decimal number."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_VERSION_DIGITS or not int(text):
        raise InvalidArgumentError(
            f"version {shown(text)} is not a version number: give 1, 2, ... or leave it "
            "empty for the newest"
        )
    return int(text)


class InferenceServicer:
    """Implements inference.GRPCInferenceService over the engine, registry and model
    control that ``tensorwire`` (tensorwire.v1's servicer) serves; translates only."""

    def __init__(
        self, tensorwire: TensorServicer, lifecycle: Lifecycle, default_deadline: float = 600.0
    ) -> None:
        self.tensorwire = tensorwire
        self.lifecycle = lifecycle
        #: How long a streamed request without a deadline may wait in a model's queue.
        self.default_deadline = default_deadline

    @property
    def engine(self) -> Engine:
        """The engine; UNAVAILABLE while the server's models load."""
        return self.tensorwire.engine

    # ------------------------------------------------------------------ health

    def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.lifecycle.state != Lifecycle.FAILED)

    def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.lifecycle.state == Lifecycle.SERVING)

    def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        version = version_number(request.version)
        entry = self.engine.registry.entries().get(request.name)
        self._target(request.name)
        serving = entry.versions if entry is not None else {}
        return pb.ModelReadyResponse(ready=version in serving if version else bool(serving))

    # ------------------------------------------------------------------ metadata

    def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="tensorwire", version=tensorwire_server.__version__, extensions=EXTENSIONS
        )

    def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        with self._version(request.name, request.version) as (entry, served):
            return describe.metadata(entry, served)

    def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        with self._version(request.name, request.version) as (_, served):
            return pb.ModelConfigResponse(config=describe.config(served))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        version = version_number(request.version)
        entries = self.engine.registry.entries()
        if request.name:
            self._target(request.name)
            entry = entries.get(request.name)
            if entry is None:
                raise NotFoundError(f"model {shown(request.name)} not found")
            entries = {request.name: entry}
        response = pb.ModelStatisticsResponse()
        for _, entry in sorted(entries.items()):
            for number, served in entry.versions.items():
                if version in (0, number):
                    response.model_stats.append(describe.statistics(served.stats.snapshot()))
        if version and not response.model_stats:
            raise NotFoundError(f"model {shown(request.name)} has no version {version}")
        return response

    # ------------------------------------------------------------------ repository

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        entries = self.engine.registry.entries()
        control = self.tensorwire.control
        unloaded: list[str] = []
        if control is not None and control.root is not None:
            try:
                unloaded = model_names(control.root)
            except ConfigError as exc:
                log.warning("RepositoryIndex: cannot list the model repository: %s", exc)
        return describe.index(entries, unloaded, request.ready)

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        for key in request.parameters:
            if key == "config" or key.startswith("file:"):
                raise InvalidArgumentError(
                    f"parameter {shown(key)}: a configuration or files sent with the request "
                    "are not supported; put the model in the model repository"
                )
        self._target(request.model_name)
        self._control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        # unload_dependents is accepted: no tensorwire model depends on another.
        self._target(request.model_name)
        self._control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ inference

    def infer(self, request: codec.InferRequest, deadline: float | None) -> codec.Answer:
        """Run one ModelInferRequest (unary or streamed) through the engine."""
        message = request.message
        self._target(message.model_name)
        call = observe.current()
        if call is not None:
            call.bytes_in += request.payload_bytes
        registry = self.engine.registry
        # The model and version first: an unknown model is NOT_FOUND whatever its inputs.
        with registry.using(message.model_name, version_number(message.model_version)) as served:
            wanted = codec.wanted(message)
            limits = self.tensorwire.limits
            limits.request_bytes(request.payload_bytes)
            inputs = codec.inputs(request, limits)
            inference = self.engine.infer(
                served.name, inputs, wanted.outputs, served.version, deadline
            )
        answer = codec.answer(message, inference.version, inference.outputs, wanted.typed)
        if call is not None:
            call.batch = inference.batch
            call.bytes_out += answer.payload_bytes
        return answer

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _version(self, name: str, version: str) -> Iterator[tuple[ModelEntry, ServedVersion]]:
        self._target(name)
        registry = self.engine.registry
        with registry.using(name, version_number(version)) as served:
            entry = registry.entries().get(name) or ModelEntry(
                served.config, {served.version: served}
            )
            yield entry, served

    def _target(self, name: str) -> None:
        """Tell the call's record which model it asks about; a name the server does not
        know is labelled "unknown" (clients must not grow the metrics without bound)."""
        call = observe.current()
        if call is not None and name:
            call.target = name if name in self.engine.registry else "unknown"

    @property
    def _control(self) -> ModelControl:
        if self.tensorwire.control is None:
            raise FailedPreconditionError("this server cannot load or unload models")
        return self.tensorwire.control

    def stream_deadline(self, context: grpc.ServicerContext) -> float:
        """When a streamed request must have left the model's queue: the call's deadline,
        else default_deadline from its arrival."""
        remaining = context.time_remaining()
        if remaining is None or remaining > _CENTURY:
            remaining = self.default_deadline
        return time.monotonic() + remaining


class _IdleCutoff:
    """Cancels a stream that has waited ``seconds`` for its next request: an idle client
    must not hold a worker thread forever. A request being answered is not idleness."""

    def __init__(self, seconds: float, cancel: Callable[[], Any]) -> None:
        self.seconds = seconds
        self.cancel = cancel
        self.last = time.monotonic()
        self.busy = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._arm(seconds)

    def touch(self, busy: bool) -> None:
        """A request arrived (busy) or its answer went out (idle again)."""
        self.last = time.monotonic()
        self.busy = busy

    def close(self) -> None:
        """The stream ended: stop watching."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()

    def _arm(self, delay: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._timer = threading.Timer(delay, self._check)
            self._timer.daemon = True
            self._timer.start()

    def _check(self) -> None:
        idle = time.monotonic() - self.last
        if self.busy or idle < self.seconds:
            self._arm(self.seconds if self.busy else self.seconds - idle)
            return
        with self._lock:
            if self._closed:
                return
        log.info("ModelStreamInfer: no request for %.3g s; closing the stream", idle)
        self.cancel()


def _unary(
    method: str, behavior: Callable[[Any], Message]
) -> Callable[[Any, grpc.ServicerContext], Message]:
    def handle(request: Any, context: grpc.ServicerContext) -> Message:
        with statuses(method, context):
            if isinstance(request, TensorwireError):
                raise request
            return behavior(request)
        raise AssertionError("unreachable")  # statuses aborts, and abort raises

    return handle


def _infer_unary(
    method: str, servicer: InferenceServicer
) -> Callable[[Any, grpc.ServicerContext], bytes]:
    def handle(
        request: codec.InferRequest | TensorwireError, context: grpc.ServicerContext
    ) -> bytes:
        with statuses(method, context):
            if isinstance(request, TensorwireError):
                raise request
            call = observe.current()
            answer = servicer.infer(request, call.deadline if call is not None else None)
            if answer.payload_bytes > servicer.tensorwire.unary_limit:
                raise OutOfRangeError(
                    f"the response holds {answer.payload_bytes} payload bytes, more than one "
                    "message carries; tensorwire.v1's InferStream streams it"
                )
            return answer.finish()
        raise AssertionError("unreachable")

    return handle


def _infer_stream(
    method: str, servicer: InferenceServicer
) -> Callable[[Iterator[Any], grpc.ServicerContext], Iterator[bytes]]:
    def handle(
        requests: Iterator[codec.InferRequest | TensorwireError], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        cutoff = _IdleCutoff(servicer.tensorwire.limits.max_stream_seconds, context.cancel)
        try:
            for request in requests:
                cutoff.touch(busy=True)
                try:
                    if isinstance(request, TensorwireError):
                        raise request
                    answer = servicer.infer(request, servicer.stream_deadline(context))
                    response = answer.streamed()
                except TensorwireError as exc:
                    # As Triton does: the request's error in its response; the stream goes on.
                    log.debug("%s: %s %s", method, exc.code, exc.message)
                    response = codec.stream_error(clip(exc.message), request)
                except Exception:
                    log.exception("%s failed with a server error", method)
                    response = codec.stream_error(f"{method}: internal server error", request)
                cutoff.touch(busy=False)  # a client that stops reading is idle too
                yield response
        except grpc.RpcError as exc:
            exc.__traceback__ = None  # gRPC keeps it in the call's state: keep no payloads
            log.debug("%s: the stream was cancelled", method)
        finally:
            cutoff.close()

    return handle


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def inference_service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler[Any, Any]:
    """Every method of inference.GRPCInferenceService, named from its descriptor."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        name = f"{SERVICE.name}.{method.name}"
        if method.name == "ModelInfer":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _infer_unary(name, servicer),
                request_deserializer=codec.receive_infer,
                response_serializer=bytes,  # already serialized, raw contents spliced in
            )
        elif method.name == "ModelStreamInfer":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _infer_stream(name, servicer),
                request_deserializer=codec.receive_infer,
                response_serializer=bytes,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(name, getattr(servicer, method.name)),
                request_deserializer=codec.parse(getattr(pb, method.input_type.name)),
                response_serializer=_serialize,
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
