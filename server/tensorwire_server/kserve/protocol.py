"""The v2 protocol over the service core, whatever carries it: each of
inference.GRPCInferenceService's methods as a call taking and giving its messages
(``InferenceServicer``), which the gRPC service (``servicer``) and the HTTP/REST one
(the rest package) both translate to. Nothing here knows a transport."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Final, TypeVar

import numpy as np

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
R = TypeVar("R")

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

    def kind(self, request: codec.InferRequest) -> Hashable | None:
        """The kind of work a request not waiting for a batch is, which Compute measures
        to place it: by model and payload size, as tensorwire.v1's Infer is
        (servicer.TensorServicer.kind). None (always on a thread) for one using shared
        memory, whose copies its payload's size does not show, or a batched model's."""
        name = request.message.model_name
        if request.shared or self.service.batched(name):
            return None
        return (
            "ModelInfer",
            self.service.label(name, functions=False),
            request.payload_bytes.bit_length(),
        )

    async def infer_placed(
        self,
        request: codec.InferRequest,
        deadline: float | None,
        compute: Compute,
        then: Callable[[codec.Answer], R],
        then_kind: Hashable | None = None,
    ) -> R:
        """``then(infer(...))`` where it belongs, for any protocol: a batched model's
        request waits for its batch on the loop and ``then`` runs there (gRPC's: the
        answer's bytes are views), or where Compute puts work of ``then_kind`` and the
        answer's size when given (REST's JSON of a large output costs a thread's
        time); another runs on a Compute thread (or inline when its kind costs
        little), ``then`` with it, off the loop."""
        if self.batched(request):
            answer = await self.infer_async(request, deadline, compute.run)
            if then_kind is None:
                return then(answer)
            return await compute.run(
                then, answer, kind=(then_kind, answer.payload_bytes.bit_length())
            )

        def answered(request: codec.InferRequest) -> R:
            return then(self.infer(request, deadline))

        return await compute.run(answered, request, kind=self.kind(request))

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
