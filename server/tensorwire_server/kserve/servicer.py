"""The v2 protocol's gRPC service, inference.GRPCInferenceService: wire messages ->
calls on the service core tensorwire.v1 shares -> wire messages, with tensorwire's
error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Hashable
from typing import Any, Final

import grpc
import grpc.aio
import numpy as np
from google.protobuf.message import Message

import tensorwire_server
from tensorwire.errors import InvalidArgumentError, TensorwireError, shown
from tensorwire_server import calls, timeline
from tensorwire_server.core.service import Caller, Service
from tensorwire_server.engine.engine import Inference
from tensorwire_server.kserve import codec, describe
from tensorwire_server.kserve.placements import Regions
from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb
from tensorwire_server.models.batching import Runner
from tensorwire_server.models.config import ConfigError
from tensorwire_server.named import Named
from tensorwire_server.transport import rpc
from tensorwire_server.transport.executor import Compute
from tensorwire_server.transport.lifecycle import Lifecycle

log = logging.getLogger(__name__)

SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
#: The protocol extensions ServerMetadata reports.
EXTENSIONS: Final = ("model_configuration", "model_repository", "statistics")
#: The extension a server with --allow-shared-memory reports too.
SHARED_MEMORY: Final = "system_shared_memory"
#: And, with a CUDA device, this one.
CUDA_SHARED_MEMORY: Final = "cuda_shared_memory"
_MAX_VERSION_DIGITS: Final = 18
#: The methods that load or unload models, or open a CUDA IPC handle (the driver may
#: take a while): off the event loop, on a Compute thread.
OFF_LOOP: Final = frozenset(
    {"RepositoryModelLoad", "RepositoryModelUnload", "CudaSharedMemoryRegister"}
)


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
    """Implements inference.GRPCInferenceService over the Service that tensorwire.v1
    serves too; translates only."""

    def __init__(
        self,
        service: Service,
        lifecycle: Lifecycle,
        default_deadline: float,
        unary_limit: int = rpc.UNARY_LIMIT,
    ) -> None:
        self.service = service
        self.lifecycle = lifecycle
        #: How long a streamed request without a deadline may wait in a model's queue.
        self.default_deadline = default_deadline
        #: Payload bytes a unary response may carry; a larger one is OUT_OF_RANGE.
        self.unary_limit = unary_limit

    # ------------------------------------------------------------------ health

    def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.lifecycle.state != Lifecycle.FAILED)

    def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.lifecycle.state == Lifecycle.SERVING)

    def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        version = version_number(request.version)
        ready = self.service.model_ready(request.name, version)
        self._target(request.name)
        return pb.ModelReadyResponse(ready=ready)

    # ------------------------------------------------------------------ metadata

    def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        extensions: tuple[str, ...] = EXTENSIONS
        if self.service.shared_memory.enabled:
            extensions += (SHARED_MEMORY,)
        if self.service.cuda_memory.available:
            extensions += (CUDA_SHARED_MEMORY,)
        return pb.ServerMetadataResponse(
            name="tensorwire", version=tensorwire_server.__version__, extensions=extensions
        )

    def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        self._target(request.name)
        version = version_number(request.version)
        with self.service.described(request.name, version) as (entry, served):
            return describe.metadata_to_wire(entry, served)

    def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        self._target(request.name)
        version = version_number(request.version)
        with self.service.serving(request.name, version) as served:
            return pb.ModelConfigResponse(config=describe.config_to_wire(served))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        version = version_number(request.version)
        self._target(request.name)
        snapshots = self.service.statistics(request.name, version)
        return pb.ModelStatisticsResponse(
            model_stats=[describe.statistics_to_wire(s) for s in snapshots]
        )

    # ------------------------------------------------------------------ repository

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        entries = self.service.models()
        unloaded: list[str] = []
        try:
            unloaded = self.service.repository_models()
        except ConfigError as exc:
            log.warning("RepositoryIndex: cannot list the model repository: %s", exc)
        return describe.index_to_wire(entries, unloaded, request.ready)

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
        self.service.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        # unload_dependents is accepted: no tensorwire model depends on another.
        self._target(request.model_name)
        self.service.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ shared memory
    # Regions belong to the caller (its token) that registered them: another caller's
    # names are unknown to it, as if never registered.

    def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest
    ) -> pb.SystemSharedMemoryStatusResponse:
        found = self.service.shared_memory.status(self._owner(), request.name)
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in found
            }
        )

    def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.service.shared_memory.register(
            self._owner(registering=True),
            request.name,
            request.key,
            request.offset,
            request.byte_size,
        )
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.service.shared_memory.unregister(self._owner(), request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest
    ) -> pb.CudaSharedMemoryStatusResponse:
        found = self.service.cuda_memory.status(self._owner(), request.name)
        status = pb.CudaSharedMemoryStatusResponse.RegionStatus
        return pb.CudaSharedMemoryStatusResponse(
            regions={
                r.name: status(name=r.name, device_id=r.device_id, byte_size=r.byte_size)
                for r in found
            }
        )

    def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self.service.cuda_memory.register(
            self._owner(registering=True),
            request.name,
            request.raw_handle,
            request.device_id,
            request.byte_size,
        )
        return pb.CudaSharedMemoryRegisterResponse()

    def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.service.cuda_memory.unregister(self._owner(), request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    # ------------------------------------------------------------------ inference

    def infer(self, request: codec.InferRequest, deadline: float | None) -> codec.Answer:
        """Run one ModelInferRequest (unary or streamed) through the service."""
        message, inputs, wanted, name, version, regions = self._accepted(request)
        caller = Caller(deadline=deadline)
        export = regions.export(wanted)
        inference = self.service.infer(caller, name, inputs, wanted.outputs, version, export=export)
        return self._answer(message, inference, wanted, regions)

    async def infer_async(
        self, request: codec.InferRequest, deadline: float | None, run: Runner
    ) -> codec.Answer:
        """``infer`` from the event loop, for a batched model: the request waits for its
        batch as a task, which ``run`` carries to a thread."""
        message, inputs, wanted, name, version, regions = self._accepted(request)
        caller = Caller(deadline=deadline)
        inference = await self.service.infer_async(
            caller, name, inputs, wanted.outputs, version, run
        )
        return self._answer(message, inference, wanted, regions)

    def batched(self, request: codec.InferRequest | TensorwireError) -> bool:
        """Whether a request waits for a batch on the loop (its model batches). One
        using shared memory waits on a thread: its copies must not hold the loop."""
        return (
            isinstance(request, codec.InferRequest)
            and not request.shared
            and self.service.batched(request.message.model_name)
        )

    def _accepted(
        self, request: codec.InferRequest
    ) -> tuple[pb.ModelInferRequest, Named[np.ndarray], codec.Wanted, str, int, Regions]:
        """A request labelled, counted, checked and decoded: its inputs, what it wants
        back, the model and version that will answer it, and its shared memory."""
        message = request.message
        self._target(message.model_name)
        call = calls.current()
        if call is not None:
            call.bytes_in += request.payload_bytes
        service = self.service
        version = version_number(message.model_version)
        # The model and version first: an unknown model is NOT_FOUND whatever its inputs.
        with service.serving(message.model_name, version) as served:
            wanted = codec.wanted(message)
            service.limits.request_bytes(request.payload_bytes)
            # Only a request that uses shared memory asks whose regions it sees (a
            # session it names must then exist).
            regions = Regions(service, self._owner() if request.shared else "")
            for output, place in wanted.placed.items():
                # Before the model runs: a bad output region fails the request early.
                regions.check_output(place, f"requested output {shown(output)}")
            inputs = codec.inputs(request, service.limits, regions.read)
            return message, inputs, wanted, served.name, served.version, regions

    def _answer(
        self,
        message: pb.ModelInferRequest,
        inference: Inference,
        wanted: codec.Wanted,
        regions: Regions,
    ) -> codec.Answer:
        outputs = inference.outputs
        with timeline.phase(timeline.ENCODE):
            answer = codec.answer(message, inference.version, outputs, wanted, regions.write)
        call = calls.current()
        if call is not None:
            call.batch = inference.batch
            call.version = inference.version
            call.bytes_out += answer.payload_bytes
        return answer

    # ------------------------------------------------------------------ internals

    def _owner(self, registering: bool = False) -> str:
        """Whose shared-memory regions the call being answered sees: its token's, or
        its session's (Service.region_owner)."""
        call = calls.current()
        if call is None:
            return ""
        return self.service.region_owner(Caller(call.caller, call.session), registering)

    def _target(self, name: str) -> None:
        """Tell the call's record which model it asks about (a metric label: see
        Service.label)."""
        call = calls.current()
        if call is not None and name:
            call.target = self.service.label(name, functions=False)

    def stream_deadline(self, context: rpc.Context) -> float:
        """When a streamed request must have left the model's queue: the call's deadline,
        else default_deadline from its arrival."""
        remaining = rpc.remaining(context)
        return time.monotonic() + (self.default_deadline if remaining is None else remaining)


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
    service = servicer.service

    def kind(request: codec.InferRequest) -> Hashable | None:
        # Placed by its measured cost as tensorwire.v1's Infer is (servicer.TensorServicer.kind).
        # Shared memory's copies, unseen in the payload's size, always run on a thread.
        name = request.message.model_name
        if request.shared or service.batched(name):
            return None
        return (
            "ModelInfer",
            service.label(name, functions=False),
            request.payload_bytes.bit_length(),
        )

    def finish(answer: codec.Answer) -> bytes:
        rpc.one_message(answer.payload_bytes, servicer.unary_limit, "tensorwire.v1's InferStream")
        return answer.finish()

    def run(request: codec.InferRequest) -> bytes:
        call = calls.current()
        return finish(servicer.infer(request, call.deadline if call is not None else None))

    handle = rpc.unary(method, run, compute, kind)

    async def infer(request: codec.InferRequest | TensorwireError, context: rpc.Context) -> bytes:
        # A batched model's requests wait for their batch on the loop, not on threads.
        async with rpc.statuses(method, context):
            if servicer.batched(request):
                assert isinstance(request, codec.InferRequest)
                call = calls.current()
                deadline = call.deadline if call is not None else None
                return finish(await servicer.infer_async(request, deadline, compute.run))
        return await handle(request, context)

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
                    deadline = servicer.stream_deadline(context)
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
