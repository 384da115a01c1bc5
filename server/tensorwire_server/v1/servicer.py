"""The tensorwire.v1 gRPC service: wire messages -> service calls -> wire messages."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from tensorwire.errors import (
    InvalidArgumentError,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Encoder, Received, receiver
from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server.core.service import Caller, ServerInfo, Service
from tensorwire_server.dataport.listener import DataPlane
from tensorwire_server.engine.engine import Inference
from tensorwire_server.engine.programs import PlanStep, ProgramPlan
from tensorwire_server.models.batching import Runner
from tensorwire_server.models.config import ModelConfig
from tensorwire_server.models.model import IOSpec, Model
from tensorwire_server.models.registry import FAILED, READY, ModelEntry
from tensorwire_server.models.statistics import StatsSnapshot
from tensorwire_server.named import Named
from tensorwire_server.transport import observability, rpc
from tensorwire_server.transport.executor import Compute
from tensorwire_server.v1.streams import streamed

SERVICE = pb.DESCRIPTOR.services_by_name["TensorService"]

M = TypeVar("M", bound=Message)


class TensorServicer:
    """Implements tensorwire.v1.TensorService over a Service; translates only."""

    def __init__(
        self,
        service: Service,
        chunk_size: int,
        unary_limit: int = rpc.UNARY_LIMIT,
        data_plane: DataPlane | None = None,
    ) -> None:
        self.service = service
        #: Where streamed payloads may travel instead of chunks; None: chunks only.
        self.data_plane = data_plane
        #: Payload bytes per chunk message of a streamed response.
        self.chunk_size = chunk_size
        #: Payload bytes a unary response may carry; a larger one is OUT_OF_RANGE.
        self.unary_limit = unary_limit

    def admit(self, request: Received[Any], unary: bool) -> None:
        """Tell the call's record what is asked of whom; check a unary request against
        the limits (a streamed one was checked as its buffers were allocated); then
        record its payload bytes. One walk of the message for all of it."""
        call = observability.current()
        if call is not None:
            message = request.message
            target = getattr(message, "model", "") or getattr(message, "function", "")
            call.target = self.service.label(target)
        limits = self.service.limits
        payload_bytes = limits.received(request) if unary else request.payload_bytes
        if call is not None:
            call.bytes_in = payload_bytes

    def batched(self, request: Received[pb.InferRequest]) -> bool:
        """Whether an Infer request waits for a batch: its model batches, and it keeps
        nothing in a session (a kept result runs alone)."""
        message = request.message
        return not message.keep and self.service.batched(message.model)

    def kind(self, method: str, request: Received[Any]) -> Hashable | None:
        """The kind of work an admitted request is, for Compute to place by its cost:
        the method, its model or function, and its payload size to a power of two.
        None (always on a thread) for a batched model, whose requests wait for each
        other on threads."""
        call = observability.current()
        if call is None:
            return None
        if method == "Infer" and self.service.batched(request.message.model):
            return None
        return (method, call.target, call.bytes_in.bit_length())

    @staticmethod
    def answered(response: Encoder[Any]) -> None:
        """Tell the call's record how many bytes its answer carries."""
        call = observability.current()
        if call is not None:
            call.bytes_out = response.payload_bytes

    def Info(self, request: Received[pb.InfoRequest]) -> Encoder[pb.InfoResponse]:
        return Encoder(info_to_wire(self.service.info()))

    def Infer(self, request: Received[pb.InferRequest]) -> Encoder[pb.InferResponse]:
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        inference = self.service.infer(
            caller,
            message.model,
            request.named(message.inputs, "input"),
            list(message.outputs),
            message.version,
            message.keep,
        )
        return _inferred(message, inference)

    async def infer_batched(
        self, request: Received[pb.InferRequest], run: Runner
    ) -> Encoder[pb.InferResponse]:
        """Infer for a batched model, from the event loop: the request waits for its
        batch as a task, not on a thread (``run`` carries the batch to one)."""
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        inference = await self.service.infer_async(
            caller,
            message.model,
            request.named(message.inputs, "input"),
            list(message.outputs),
            message.version,
            run,
        )
        return _inferred(message, inference)

    def Grad(self, request: Received[pb.GradRequest]) -> Encoder[pb.GradResponse]:
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        grad_outputs = request.named(message.grad_outputs, "grad_outputs")
        if message.WhichOneof("target") == "function":
            if message.param_grads:
                raise InvalidArgumentError(
                    "param_grads needs a model; functions have no parameters"
                )
            args, kwargs = request.arguments(message.args, message.kwargs)
            outcome = self.service.grad_function(
                caller,
                message.function,
                args,
                kwargs,
                list(message.wrt),
                grad_outputs,
                message.keep,
            )
        else:
            outcome = self.service.grad_model(
                caller,
                message.model,
                request.named(message.inputs, "input"),
                list(message.wrt),
                grad_outputs,
                message.param_grads,
                message.model_version,
                message.keep,
            )
        encoder = Encoder(pb.GradResponse())
        response = encoder.message
        named_to_wire(encoder, response.outputs, outcome.outputs)
        named_to_wire(encoder, response.grads, outcome.grads)
        named_to_wire(encoder, response.param_grads, outcome.param_grads)
        return encoder

    def Call(self, request: Received[pb.CallRequest]) -> Encoder[pb.CallResponse]:
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        args, kwargs = request.arguments(message.args, message.kwargs)
        outputs = self.service.call(caller, message.function, args, kwargs, message.keep)
        encoder = Encoder(pb.CallResponse())
        named_to_wire(encoder, encoder.message.outputs, outputs)
        return encoder

    def ModelStatistics(
        self, request: Received[pb.ModelStatisticsRequest]
    ) -> Encoder[pb.ModelStatisticsResponse]:
        message = request.message
        snapshots = self.service.statistics(message.model, message.version)
        return Encoder(
            pb.ModelStatisticsResponse(statistics=[statistics_to_wire(s) for s in snapshots])
        )

    def Load(self, request: Received[pb.LoadRequest]) -> Encoder[pb.LoadResponse]:
        entry = self.service.load(request.message.model)
        return Encoder(pb.LoadResponse(model=model_to_wire(entry)))

    def Unload(self, request: Received[pb.UnloadRequest]) -> Encoder[pb.UnloadResponse]:
        message = request.message
        self.service.unload(message.model, message.version)
        return Encoder(pb.UnloadResponse())

    # ------------------------------------------------------------------ sessions

    def OpenSession(
        self, request: Received[pb.OpenSessionRequest]
    ) -> Encoder[pb.OpenSessionResponse]:
        session = self.service.open_session(_caller())
        return Encoder(
            pb.OpenSessionResponse(
                session=session.id, quota_bytes=session.quota, ttl_seconds=session.ttl
            )
        )

    def CloseSession(
        self, request: Received[pb.CloseSessionRequest]
    ) -> Encoder[pb.CloseSessionResponse]:
        freed = self.service.close_session(_caller())
        return Encoder(pb.CloseSessionResponse(freed_bytes=freed))

    def DescribeSession(
        self, request: Received[pb.DescribeSessionRequest]
    ) -> Encoder[pb.DescribeSessionResponse]:
        summary = self.service.workspace(_caller()).summary()
        encoder = Encoder(
            pb.DescribeSessionResponse(
                session=summary.id,
                trainers=summary.trainers,
                bytes=summary.bytes,
                quota_bytes=summary.quota,
                ttl_seconds=summary.ttl,
            )
        )
        for handle in summary.handles:
            encoder.tensor(encoder.message.handles.add(), handle)
        return encoder

    def Put(self, request: Received[pb.PutRequest]) -> Encoder[pb.PutResponse]:
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        if not message.HasField("tensor"):
            raise InvalidArgumentError("Put needs a tensor")
        value = request.array(message.tensor, "tensor")
        # A streamed request's buffers are its own: kept as they are, not copied.
        handle = self.service.workspace(caller).put(value, private=request.owned)
        encoder = Encoder(pb.PutResponse())
        encoder.tensor(encoder.message.tensor, handle)
        return encoder

    def Get(self, request: Received[pb.GetRequest]) -> Encoder[pb.GetResponse]:
        array = self.service.workspace(_caller()).get(request.message.handle)
        encoder = Encoder(pb.GetResponse())
        encoder.tensor(encoder.message.tensor, array)
        return encoder

    def Free(self, request: Received[pb.FreeRequest]) -> Encoder[pb.FreeResponse]:
        freed = self.service.workspace(_caller()).free(request.message.handles)
        return Encoder(pb.FreeResponse(freed_bytes=freed))

    def Run(self, request: Received[pb.RunRequest]) -> Encoder[pb.RunResponse]:
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        steps = []
        for index, step in enumerate(message.steps):
            args, kwargs = request.arguments(step.args, step.kwargs)
            target = step.WhichOneof("target")
            steps.append(
                PlanStep(
                    step.name or f"s{index}",
                    function=step.function if target == "function" else "",
                    model=step.model if target == "model" else "",
                    args=args,
                    kwargs=kwargs,
                    version=step.version,
                )
            )
        plan = ProgramPlan(
            inputs=request.named(message.inputs, "input"),
            steps=steps,
            outputs=list(message.outputs),
            loss=message.loss,
            wrt=list(message.wrt),
        )
        outcome = self.service.run(caller, plan, message.keep)
        encoder = Encoder(pb.RunResponse())
        named_to_wire(encoder, encoder.message.outputs, outcome.outputs)
        named_to_wire(encoder, encoder.message.grads, outcome.grads)
        return encoder

    def CreateTrainer(
        self, request: Received[pb.CreateTrainerRequest]
    ) -> Encoder[pb.CreateTrainerResponse]:
        message = request.message
        workspace = self.service.workspace(_caller())
        _, options = request.arguments([], message.optimizer.options)
        _, loss_options = request.arguments([], message.loss_options)
        trainer = workspace.create_trainer(
            message.model,
            message.version,
            message.optimizer.name,
            options,
            message.loss,
            loss_options,
        )
        return Encoder(
            pb.CreateTrainerResponse(
                trainer=trainer.id,
                bytes=trainer.bytes,
                parameters=[spec_to_wire(s) for s in trainer.specs()],
            )
        )

    def Step(self, request: Received[pb.StepRequest]) -> Encoder[pb.StepResponse]:
        caller = _caller()
        request = self._with_handles(request, caller)
        message = request.message
        trainer = self.service.workspace(caller).trainer(message.trainer)
        if not message.HasField("target"):
            raise InvalidArgumentError("Step needs a target")
        loss, steps = trainer.step(
            request.named(message.inputs, "input"),
            request.array(message.target, "target"),
            message.output,
        )
        return Encoder(pb.StepResponse(loss=loss, step=steps))

    def Parameters(self, request: Received[pb.ParametersRequest]) -> Encoder[pb.ParametersResponse]:
        message = request.message
        trainer = self.service.workspace(_caller()).trainer(message.trainer)
        encoder = Encoder(pb.ParametersResponse())
        named_to_wire(encoder, encoder.message.parameters, trainer.parameters(message.keep))
        return encoder

    def _with_handles(self, request: Received[M], caller: Caller) -> Received[M]:
        """``request`` decoding handles to the caller's session's tensors."""
        # Made directly rather than by dataclasses.replace, which is a few µs dearer.
        return Received(
            request.message, request.payloads, request.owned, self.service.resolver(caller)
        )


def _inferred(message: pb.InferRequest, inference: Inference) -> Encoder[pb.InferResponse]:
    """The InferResponse of ``inference``; the call's record learns its batch."""
    call = observability.current()
    if call is not None:
        call.batch = inference.batch
    encoder = Encoder(pb.InferResponse(model=message.model, version=inference.version))
    named_to_wire(encoder, encoder.message.outputs, inference.outputs)
    return encoder


def _caller() -> Caller:
    """Who makes the call being answered, in which session, until when (the record
    the Gate opened; nobody, no session and no deadline outside one)."""
    call = observability.current()
    if call is None:
        return Caller()
    return Caller(call.caller, call.session, call.deadline)


# ---------------------------------------------------------------------- domain -> wire


def info_to_wire(info: ServerInfo) -> pb.InfoResponse:
    """Info's answer."""
    device = info.device
    sessions = info.sessions
    return pb.InfoResponse(
        server_version=info.server_version,
        torch_version=info.torch_version,
        device=pb.DeviceInfo(
            name=device.name,
            description=device.description,
            total_memory_bytes=device.total_memory,
            free_memory_bytes=device.free_memory,
        ),
        models=[model_to_wire(entry) for entry in info.models],
        functions=[pb.FunctionInfo(name=n, description=d) for n, d in info.functions],
        sessions=pb.SessionsSummary(
            count=sessions.count,
            bytes=sessions.bytes,
            quota_bytes=sessions.quota,
            ttl_seconds=sessions.ttl,
            max_sessions=sessions.max_sessions,
            losses=sessions.losses,
            optimizers=sessions.optimizers,
        ),
    )


def model_to_wire(entry: ModelEntry) -> pb.ModelInfo:
    """One model: its signature, configuration, state and every version."""
    config = entry.config
    newest = entry.newest()
    # The signature the newest version's files carry, else the configuration's.
    signature: Model | ModelConfig = newest.model if newest is not None else config
    info = pb.ModelInfo(
        name=config.name,
        description=config.description,
        inputs=[spec_to_wire(s) for s in signature.inputs],
        outputs=[spec_to_wire(s) for s in signature.outputs],
        variadic=config.variadic,
        state=entry.state,
        reason=entry.reason,
        max_batch_size=config.max_batch_size,
        precision=config.precision,
        max_queue_size=config.max_queue_size,
    )
    if newest is not None:
        model = newest.model
        info.kind = model.kind
        info.description = model.description or config.description
        info.parameter_count = model.parameter_count()
        info.instances.extend(str(i.device) for i in newest.instances)
    if newest is not None and newest.batcher is not None and config.batching is not None:
        info.dynamic_batching.max_queue_delay_seconds = config.batching.max_queue_delay
        info.dynamic_batching.preferred_batch_sizes.extend(config.batching.preferred_batch_sizes)
    for number, served in entry.versions.items():
        info.versions.add(
            version=number, state=READY, statistics=statistics_to_wire(served.stats.snapshot())
        )
    for number, reason in sorted(entry.failures.items(), reverse=True):
        if number:
            info.versions.add(version=number, state=FAILED, reason=reason)
    return info


def statistics_to_wire(snapshot: StatsSnapshot) -> pb.VersionStatistics:
    """One version's counters."""
    return pb.VersionStatistics(
        model=snapshot.model,
        version=snapshot.version,
        request_count=snapshot.requests,
        failure_count=snapshot.failures,
        inference_count=snapshot.inferences,
        execution_count=snapshot.executions,
        queue_seconds=snapshot.queue_seconds,
        compute_seconds=snapshot.compute_seconds,
        batch_sizes=snapshot.batch_sizes,
        rejected_count=snapshot.rejected,
        expired_count=snapshot.expired,
    )


def spec_to_wire(spec: IOSpec) -> pb.TensorSpec:
    """An input, output or parameter: no dtype, no shape where any goes."""
    return pb.TensorSpec(
        name=spec.name,
        dtype=WIRE_BY_NAME[spec.dtype] if spec.dtype else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
        shape=spec.shape or (),
        any_shape=spec.shape is None,
    )


def named_to_wire(encoder: Encoder[Any], field: Any, tensors: Named[Any]) -> None:
    """Add each named array (or handle) to repeated NamedTensor ``field``."""
    for name, value in tensors:
        encoder.named(field.add(), name, value)


# ---------------------------------------------------------------------- handlers


#: The methods that only read or name state already there: answered on the event loop.
#: Everything else computes, copies or loads, through Compute.
ON_THE_LOOP: Final = frozenset(
    {"Info", "ModelStatistics", "OpenSession", "DescribeSession", "Free", "CloseSession"}
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
        servicer.answered(encoder)
        rpc.one_message(encoder.payload_bytes, servicer.unary_limit, f"{method}Stream")
        return encoder.finish()

    def answer(request: Received[Any]) -> bytes:
        return finish(behavior(request))

    handle = rpc.unary(method, answer, compute, prepare)
    if short != "Infer" or compute is None:
        return handle

    async def infer(request: Any, context: rpc.Context) -> bytes:
        # A batched model's requests wait for their batch on the loop, not on threads.
        async with rpc.statuses(method, context):
            if isinstance(request, Received) and servicer.batched(request):
                servicer.admit(request, unary=True)
                return finish(await servicer.infer_batched(request, compute.run))
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
