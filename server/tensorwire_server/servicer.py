"""The gRPC layer: wire messages <-> engine calls, and one error mapping for every RPC."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Final, TypeVar

import grpc
import torch
from google.protobuf.message import Message

import tensorwire_server
from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    TensorwireError,
    UnavailableError,
    shown,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import streaming
from tensorwire.wire.codec import Encoder, Handle, Received, receiver
from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire.wire.protocol import SESSION_KEY
from tensorwire.wire.streaming import DEFAULT_CHUNK_SIZE, StreamReceiver
from tensorwire_server import observe, programs, training
from tensorwire_server.engine import Engine, Export, GradOutcome, as_array
from tensorwire_server.limits import Limits
from tensorwire_server.loading import ModelControl
from tensorwire_server.models import IOSpec, Model
from tensorwire_server.named import Named
from tensorwire_server.registry import FAILED, READY, ModelEntry
from tensorwire_server.repository import ModelConfig
from tensorwire_server.sessions import Session, Sessions
from tensorwire_server.staging import stager_for
from tensorwire_server.statistics import StatsSnapshot
from tensorwire_server.tensors import dtype_name, to_device
from tensorwire_server.training import LOSSES, OPTIMIZERS, TrainingState

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TensorService"]
# Payload bytes a unary response may hold: protobuf caps a message at 2 GiB - 1, and
# the rest of the message needs room too. Larger responses go through *Stream.
UNARY_LIMIT: Final = 2**31 - 2**20

Behavior = Callable[[Received[Any]], Encoder[Any]]
M = TypeVar("M", bound=Message)


class TensorServicer:
    """Implements tensorwire.v1.TensorService over an Engine; translates only."""

    def __init__(
        self,
        engine: Engine | None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        unary_limit: int = UNARY_LIMIT,
        limits: Limits | None = None,
        control: ModelControl | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self._engine = engine
        #: Every client's kept tensors and trainers.
        self.sessions = sessions or Sessions(4 << 30, 600.0, 64)
        #: Loads and unloads models while serving; None: models are fixed.
        self.control = control
        self.chunk_size = chunk_size
        self.unary_limit = unary_limit
        self.limits = limits or Limits()

    @property
    def engine(self) -> Engine:
        """The engine; UNAVAILABLE until the server has one (its models still loading)."""
        if self._engine is None:
            raise UnavailableError("the server is starting: models are loading")
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    def admit(self, request: Received[Any], unary: bool) -> None:
        """Tell the call's record what is asked of whom; check a unary request against
        the limits (a streamed one was checked as its buffers were allocated); then
        record its payload bytes. One walk of the message for all of it."""
        call = observe.current()
        message = request.message
        if call is not None:
            target = getattr(message, "model", "") or getattr(message, "function", "")
            engine = self.engine
            # Only names the server knows become metric labels: a client inventing
            # names must not grow the metrics without bound.
            known = target in engine.registry or target in engine.functions
            call.target = target if known or not target else "unknown"
        payload_bytes = self.limits.received(request) if unary else request.payload_bytes
        if call is not None:
            call.bytes_in = payload_bytes

    @staticmethod
    def answered(response: Encoder[Any]) -> None:
        """Tell the call's record how many bytes its answer carries."""
        call = observe.current()
        if call is not None:
            call.bytes_out = response.payload_bytes

    def Info(self, request: Received[pb.InfoRequest]) -> Encoder[pb.InfoResponse]:
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
        for _, entry in sorted(engine.registry.entries().items()):
            response.models.append(_model_info(entry))
        for name in sorted(engine.functions):
            response.functions.add(name=name, description=engine.functions[name].description)
        sessions = self.sessions
        response.sessions.CopyFrom(
            pb.SessionsSummary(
                count=sessions.count(),
                bytes=sessions.bytes(),
                quota_bytes=sessions.quota,
                ttl_seconds=sessions.ttl,
                max_sessions=sessions.max_sessions,
                losses=sorted(LOSSES),
                optimizers=sorted(OPTIMIZERS),
            )
        )
        return Encoder(response)

    def Infer(self, request: Received[pb.InferRequest]) -> Encoder[pb.InferResponse]:
        request = self._with_handles(request)
        message = request.message
        call = observe.current()
        inference = self.engine.infer(
            message.model,
            request.named(message.inputs, "input"),
            list(message.outputs),
            message.version,
            call.deadline if call is not None else None,
            self._keeper() if message.keep else None,
        )
        if call is not None:
            call.batch = inference.batch
        encoder = Encoder(pb.InferResponse(model=message.model, version=inference.version))
        _fill(encoder, encoder.message.outputs, inference.outputs)
        return encoder

    def Grad(self, request: Received[pb.GradRequest]) -> Encoder[pb.GradResponse]:
        request = self._with_handles(request)
        message = request.message
        export = self._keeper() if message.keep else as_array
        grad_outputs = request.named(message.grad_outputs, "grad_outputs")
        outcome: GradOutcome
        if message.WhichOneof("target") == "function":
            if message.param_grads:
                raise InvalidArgumentError(
                    "param_grads needs a model; functions have no parameters"
                )
            args, kwargs = request.arguments(message.args, message.kwargs)
            _no_refs(args, kwargs)
            outcome = self.engine.grad_function(
                message.function, args, kwargs, list(message.wrt), grad_outputs, export
            )
        else:
            outcome = self.engine.grad_model(
                message.model,
                request.named(message.inputs, "input"),
                list(message.wrt),
                grad_outputs,
                message.param_grads,
                message.model_version,
                export,
            )
        encoder = Encoder(pb.GradResponse())
        response = encoder.message
        _fill(encoder, response.outputs, outcome.outputs)
        _fill(encoder, response.grads, outcome.grads)
        _fill(encoder, response.param_grads, outcome.param_grads)
        return encoder

    def Call(self, request: Received[pb.CallRequest]) -> Encoder[pb.CallResponse]:
        request = self._with_handles(request)
        message = request.message
        args, kwargs = request.arguments(message.args, message.kwargs)
        _no_refs(args, kwargs)
        export = self._keeper() if message.keep else as_array
        outputs = self.engine.call(message.function, args, kwargs, export)
        encoder = Encoder(pb.CallResponse())
        _fill(encoder, encoder.message.outputs, outputs)
        return encoder

    def ModelStatistics(
        self, request: Received[pb.ModelStatisticsRequest]
    ) -> Encoder[pb.ModelStatisticsResponse]:
        message = request.message
        entries = self.engine.registry.entries()
        if message.model:
            entry = entries.get(message.model)
            if entry is None:
                raise NotFoundError(f"model {shown(message.model)} not found")
            entries = {message.model: entry}
        response = pb.ModelStatisticsResponse()
        for _, entry in sorted(entries.items()):
            for number, served in entry.versions.items():
                if message.version in (0, number):
                    response.statistics.append(_statistics(served.stats.snapshot()))
        if message.version and not response.statistics:
            raise NotFoundError(f"model {shown(message.model)} has no version {message.version}")
        return Encoder(response)

    def Load(self, request: Received[pb.LoadRequest]) -> Encoder[pb.LoadResponse]:
        entry = self._control.load(request.message.model)
        return Encoder(pb.LoadResponse(model=_model_info(entry)))

    def Unload(self, request: Received[pb.UnloadRequest]) -> Encoder[pb.UnloadResponse]:
        message = request.message
        self._control.unload(message.model, message.version)
        return Encoder(pb.UnloadResponse())

    # ------------------------------------------------------------------ sessions

    def OpenSession(
        self, request: Received[pb.OpenSessionRequest]
    ) -> Encoder[pb.OpenSessionResponse]:
        session = self.sessions.open(_caller())
        return Encoder(
            pb.OpenSessionResponse(
                session=session.id, quota_bytes=session.quota, ttl_seconds=session.ttl
            )
        )

    def CloseSession(
        self, request: Received[pb.CloseSessionRequest]
    ) -> Encoder[pb.CloseSessionResponse]:
        freed = self.sessions.close(self._session())
        return Encoder(pb.CloseSessionResponse(freed_bytes=freed))

    def DescribeSession(
        self, request: Received[pb.DescribeSessionRequest]
    ) -> Encoder[pb.DescribeSessionResponse]:
        summary = self._session().summary()
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
        request = self._with_handles(request)
        message = request.message
        if not message.HasField("tensor"):
            raise InvalidArgumentError("Put needs a tensor")
        value = request.array(message.tensor, "tensor")
        session = self._session()
        with self.engine.device_guard("Put"):
            tensor = to_device(value, self.engine.device)
            if isinstance(value, torch.Tensor):
                tensor = tensor.clone()  # a handle's copy, not a second name for it
            # A streamed request's buffers are its own: kept as they are, not copied.
            handle = session.keep(tensor, private=request.owned)
        encoder = Encoder(pb.PutResponse())
        encoder.tensor(encoder.message.tensor, handle)
        return encoder

    def Get(self, request: Received[pb.GetRequest]) -> Encoder[pb.GetResponse]:
        handle = request.message.handle
        tensor = self._session().tensor(handle, "Get")
        with self.engine.device_guard("Get"):
            array = as_array(handle, tensor)
        encoder = Encoder(pb.GetResponse())
        encoder.tensor(encoder.message.tensor, array)
        return encoder

    def Free(self, request: Received[pb.FreeRequest]) -> Encoder[pb.FreeResponse]:
        freed = self._session().free(request.message.handles)
        return Encoder(pb.FreeResponse(freed_bytes=freed))

    def Run(self, request: Received[pb.RunRequest]) -> Encoder[pb.RunResponse]:
        request = self._with_handles(request)
        message = request.message
        steps = []
        for index, step in enumerate(message.steps):
            name = step.name or f"s{index}"
            args, kwargs = request.arguments(step.args, step.kwargs)
            target = step.WhichOneof("target")
            steps.append(
                programs.PlanStep(
                    name,
                    function=step.function if target == "function" else "",
                    model=step.model if target == "model" else "",
                    args=args,
                    kwargs=kwargs,
                    version=step.version,
                )
            )
        program = programs.ProgramPlan(
            inputs=request.named(message.inputs, "input"),
            steps=steps,
            outputs=list(message.outputs),
            loss=message.loss,
            wrt=list(message.wrt),
        )
        export = self._keeper() if message.keep else as_array
        outcome = programs.run(self.engine, program, export)
        encoder = Encoder(pb.RunResponse())
        _fill(encoder, encoder.message.outputs, outcome.outputs)
        _fill(encoder, encoder.message.grads, outcome.grads)
        return encoder

    def CreateTrainer(
        self, request: Received[pb.CreateTrainerRequest]
    ) -> Encoder[pb.CreateTrainerResponse]:
        message = request.message
        session = self._session()
        _, options = request.arguments([], message.optimizer.options)
        _, loss_options = request.arguments([], message.loss_options)
        _no_refs([], {**options, **loss_options})
        engine = self.engine
        copying = f"copying model {message.model!r} for training"
        with (
            engine.registry.using(message.model, message.version) as served,
            engine.device_guard(copying),
        ):
            trainer = TrainingState(
                served.model,
                served.instances[0].module,
                engine.device,
                message.optimizer.name or "sgd",
                options,
                message.loss,
                {k: engine.torch_value(v) for k, v in loss_options.items()},
            )
        trainer_id = session.hold("trainer", trainer)
        response = pb.CreateTrainerResponse(trainer=trainer_id, bytes=trainer.bytes)
        for name, parameter in trainer.parameters:
            spec = IOSpec(name, dtype_name(parameter), tuple(parameter.shape))
            response.parameters.append(_spec(spec))
        return Encoder(response)

    def Step(self, request: Received[pb.StepRequest]) -> Encoder[pb.StepResponse]:
        request = self._with_handles(request)
        message = request.message
        session = self._session()
        trainer = self._trainer(session, message.trainer)
        if not message.HasField("target"):
            raise InvalidArgumentError("Step needs a target")
        inputs = request.named(message.inputs, "input")
        target = request.array(message.target, "target")
        loss, steps = training.step(self.engine, trainer, inputs, target, message.output)
        session.resize(message.trainer, lambda: trainer.bytes)
        return Encoder(pb.StepResponse(loss=loss, step=steps))

    def Parameters(self, request: Received[pb.ParametersRequest]) -> Encoder[pb.ParametersResponse]:
        message = request.message
        session = self._session()
        trainer = self._trainer(session, message.trainer)
        with trainer.lock, self.engine.device_guard("Parameters"):
            # Copies: a handle must not follow the parameter as training goes on.
            state = [(n, t.clone() if message.keep else t) for n, t in trainer.state()]
            export = self._keeper() if message.keep else as_array
            exported = [(n, export(n, t)) for n, t in state]
        encoder = Encoder(pb.ParametersResponse())
        _fill(encoder, encoder.message.parameters, exported)
        return encoder

    def _session(self) -> Session:
        """The session the call names; FAILED_PRECONDITION when it names none."""
        call = observe.current()
        if call is None or not call.session:
            raise FailedPreconditionError(
                f"this call needs a session: call OpenSession, then send its id as "
                f"metadata {SESSION_KEY!r}"
            )
        return self.sessions.get(call.session, call.caller)

    def _with_handles(self, request: Received[M]) -> Received[M]:
        """``request`` decoding handles to the session's tensors (looked up on first use)."""
        session: list[Session] = []

        def resolve(handle: Handle, name: str) -> torch.Tensor:
            if not session:
                session.append(self._session())
            return session[0].tensor(handle.id, name)

        return replace(request, resolve=resolve)

    def _keeper(self) -> Export:
        """An Export that keeps results in the call's session as handles."""
        session = self._session()
        return lambda _name, tensor: session.keep(tensor)

    @staticmethod
    def _trainer(session: Session, trainer_id: str) -> TrainingState:
        trainer = session.holding(trainer_id, "trainer")
        if not isinstance(trainer, TrainingState):
            raise NotFoundError(f"{shown(trainer_id)} is not a trainer")
        return trainer

    @property
    def _control(self) -> ModelControl:
        if self.control is None:
            raise FailedPreconditionError("this server cannot load or unload models")
        return self.control


def _caller() -> str:
    call = observe.current()
    return call.caller if call is not None else ""


def _no_refs(args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refs name program values: outside Run they name nothing."""
    if any(programs.refs([args, list(kwargs.values())])):
        raise InvalidArgumentError("a ref argument is only valid inside a Run program")


def _model_info(entry: ModelEntry) -> pb.ModelInfo:
    config = entry.config
    newest = entry.newest()
    # The signature the newest version's files carry, else the configuration's.
    signature: Model | ModelConfig = newest.model if newest is not None else config
    info = pb.ModelInfo(
        name=config.name,
        description=config.description,
        inputs=[_spec(s) for s in signature.inputs],
        outputs=[_spec(s) for s in signature.outputs],
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
            version=number, state=READY, statistics=_statistics(served.stats.snapshot())
        )
    for number, reason in sorted(entry.failures.items(), reverse=True):
        if number:
            info.versions.add(version=number, state=FAILED, reason=reason)
    return info


def _statistics(snapshot: StatsSnapshot) -> pb.VersionStatistics:
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


def _fill(encoder: Encoder[Any], field: Any, tensors: Named[Any]) -> None:
    for name, arr in tensors:
        encoder.named(field.add(), name, arr)


def _spec(spec: IOSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=WIRE_BY_NAME[spec.dtype] if spec.dtype else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
        shape=spec.shape or (),
        any_shape=spec.shape is None,
    )


@contextmanager
def statuses(method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """The one error mapping: tensorwire errors become their status with their message;
    anything else is a server bug, logged with its traceback and answered INTERNAL."""
    try:
        yield
    except TensorwireError as exc:
        # The caller's mistake, not the server's: debug level, no traceback.
        log.debug("%s: %s %s", method, exc.code, exc.message)
        context.abort(grpc.StatusCode[exc.code], clip(exc.message))
    except Exception:
        log.exception("%s failed with a server error", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal server error")


def clip(message: str, limit: int = 2000) -> str:
    """``message`` short enough to travel: a status past gRPC's metadata limit (about
    8 KiB, after escaping) would reach the client as a different error altogether."""
    if len(message.encode()) <= limit:
        return message
    cut = message.encode()[:limit].decode(errors="ignore")
    return f"{cut}... ({len(message)} characters)"


def _unary(
    method: str, behavior: Behavior, servicer: TensorServicer
) -> Callable[[Any, grpc.ServicerContext], bytes]:
    def handle(request: Received[Any] | TensorwireError, context: grpc.ServicerContext) -> bytes:
        with statuses(method, context):
            if isinstance(request, TensorwireError):
                raise request
            servicer.admit(request, unary=True)
            encoder = behavior(request)
            servicer.answered(encoder)
            if encoder.payload_bytes > servicer.unary_limit:
                raise OutOfRangeError(
                    f"the response holds {encoder.payload_bytes} payload bytes, more than "
                    f"one message carries; {method}Stream streams it"
                )
            return encoder.finish()
        raise AssertionError("unreachable")  # statuses aborts, and abort raises

    return handle


def _streaming(
    method: str,
    request_class: type[Message],
    behavior: Behavior,
    servicer: TensorServicer,
) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
    def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with statuses(method, context):
            limits = servicer.limits
            stager = stager_for(servicer.engine.device, limits)
            receiver = StreamReceiver(request_class, stager.allocate, landed=stager.landed)
            # A client that stops sending holds a worker thread: a second past the limit
            # (a part arriving late gets DEADLINE_EXCEEDED instead), cut it.
            watchdog = threading.Timer(limits.max_stream_seconds + 1, context.cancel)
            watchdog.daemon = True
            watchdog.start()
            started = time.monotonic()
            try:
                for raw in requests:
                    receiver.feed(raw)
                    limits.stream_time(time.monotonic() - started)
                watchdog.cancel()
                request = receiver.finish()
                servicer.admit(request, unary=False)
                with stager.using():
                    encoder = behavior(request)
                servicer.answered(encoder)
                del request  # from here on the buffers live only through the outputs
            except grpc.RpcError as exc:
                # The client cancelled or went away: nobody is left to answer. gRPC
                # keeps this exception in the call's state, so its traceback (and this
                # frame with the receiver) must not keep the payload alive.
                exc.__traceback__ = None
                log.debug("%s: the stream was cancelled mid-way", method)
                return
            finally:
                watchdog.cancel()
                receiver.close()  # on success `request` holds the buffers, and only it
                stager.close()
        yield from streaming.parts(encoder, servicer.chunk_size)

    return handle


def tensor_service_handler(servicer: TensorServicer) -> grpc.GenericRpcHandler[Any, Any]:
    """Every TensorService method, named from the service descriptor, with our codec."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        name = f"{SERVICE.name}.{method.name}"
        if method.client_streaming:
            # InferStream streams InferRequestPart, whose header is an InferRequest.
            request_class = getattr(pb, method.input_type.name.removesuffix("Part"))
            behavior = getattr(servicer, method.name.removesuffix("Stream"))
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(name, request_class, behavior, servicer)
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(name, getattr(servicer, method.name), servicer),
                request_deserializer=receiver(getattr(pb, method.input_type.name)),
                response_serializer=bytes,  # the servicer already encoded the response
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
