"""The tensorwire.v1 servicer: wire messages -> calls on the service core -> wire
messages. It translates only; ``describe`` words what it reports of the server and its
models, ``handlers`` serves its methods over gRPC."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

from google.protobuf.message import Message

from tensorwire.errors import FailedPreconditionError, InvalidArgumentError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Encoder, Received
from tensorwire_server import calls, timeline
from tensorwire_server.core.service import Caller, Service
from tensorwire_server.dataport.listener import DataPort
from tensorwire_server.engine.engine import Inference
from tensorwire_server.engine.programs import PlanStep, ProgramPlan
from tensorwire_server.lane.listener import LaneServer
from tensorwire_server.models.batching import Runner
from tensorwire_server.named import Named
from tensorwire_server.transport import rpc
from tensorwire_server.v1.describe import (
    info_to_wire,
    model_to_wire,
    spec_to_wire,
    statistics_to_wire,
)

M = TypeVar("M", bound=Message)


class TensorServicer:
    """Implements tensorwire.v1.TensorService over a Service; translates only."""

    def __init__(
        self,
        service: Service,
        chunk_size: int,
        unary_limit: int = rpc.UNARY_LIMIT,
        dataport: DataPort | None = None,
    ) -> None:
        self.service = service
        #: Where streamed payloads may travel instead of chunks; None: chunks only.
        self.dataport = dataport
        #: Payload bytes per chunk message of a streamed response.
        self.chunk_size = chunk_size
        #: Payload bytes a unary response may carry; a larger one is OUT_OF_RANGE.
        self.unary_limit = unary_limit
        #: The fast lane, whose grants OpenLane gives; None: off.
        self.lane: LaneServer | None = None

    def admit(self, request: Received[Any], unary: bool) -> None:
        """Tell the call's record what is asked of whom; check a unary request against
        the limits (a streamed one was checked as its buffers were allocated); then
        record its payload bytes. One walk of the message for all of it."""
        call = calls.current()
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
        call = calls.current()
        if call is None:
            return None
        if method == "Infer" and self.service.batched(request.message.model):
            return None
        return (method, call.target, call.bytes_in.bit_length())

    @staticmethod
    def answered(response: Encoder[Any], payload_bytes: int | None = None) -> None:
        """Tell the call's record how many bytes its answer carries (``payload_bytes``,
        when the caller counted them already)."""
        call = calls.current()
        if call is not None:
            call.bytes_out = response.payload_bytes if payload_bytes is None else payload_bytes

    def OpenLane(self, request: Received[pb.OpenLaneRequest]) -> Encoder[pb.OpenLaneResponse]:
        lane = self.lane
        if lane is None:
            raise FailedPreconditionError("the server's fast lane is off: call over gRPC")
        call = calls.current()
        grant, seconds = lane.grant(call.identity if call is not None else None)
        return Encoder(
            pb.OpenLaneResponse(
                grant=grant,
                port=lane.port,
                expires_in_seconds=seconds,
                max_request_bytes=lane.max_request_bytes,
                local_socket=lane.local_name,
                local_proof=lane.grants.proof(grant) if lane.local_name else b"",
            )
        )

    def Info(self, request: Received[pb.InfoRequest]) -> Encoder[pb.InfoResponse]:
        return Encoder(info_to_wire(self.service.info()))

    def Infer(self, request: Received[pb.InferRequest]) -> Encoder[pb.InferResponse]:
        caller = _caller()
        message = request.message
        # Only a handle needs the resolver: most requests carry data alone.
        if any([nt.tensor.handle for nt in message.inputs]):
            request = self._with_handles(request, caller)
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
            kept=list(message.kept),
        )
        outcome = self.service.run(caller, plan, message.keep, list(message.free))
        encoder = Encoder(pb.RunResponse())
        named_to_wire(encoder, encoder.message.outputs, outcome.outputs)
        named_to_wire(encoder, encoder.message.grads, outcome.grads)
        named_to_wire(encoder, encoder.message.kept, outcome.kept)
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
    call = calls.current()
    if call is not None:
        call.batch = inference.batch
        call.version = inference.version
    with timeline.phase(timeline.ENCODE):
        encoder = Encoder(pb.InferResponse(model=message.model, version=inference.version))
        named_to_wire(encoder, encoder.message.outputs, inference.outputs)
    return encoder


def _caller() -> Caller:
    """Who makes the call being answered, in which session, until when (the record
    the Gate opened; nobody, no session and no deadline outside one)."""
    call = calls.current()
    if call is None:
        return Caller()
    return Caller(call.caller, call.session, call.deadline)


def named_to_wire(encoder: Encoder[Any], field: Any, tensors: Named[Any]) -> None:
    """Add each named array (or handle) to repeated NamedTensor ``field``."""
    for name, value in tensors:
        encoder.named(field.add(), name, value)
