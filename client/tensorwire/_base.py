"""What Client and AsyncClient share: request building, response decoding, errors,
retries and credentials.

The twins differ only in how they wait for the transport, so every method is split
into a ``_prepare_*`` (arguments -> request encoder) and a ``_finish_*`` (decoded
response -> result) here; the choice between the unary and the streaming path, and
whether and when a failed attempt is made again, are decided here once for both.
The twins keep only their loops: ``time.sleep`` against ``await asyncio.sleep``.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, NoReturn, Self, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from tensorwire._session import Held, SessionState
from tensorwire.channel import CLIENT_OPTIONS, Pem, SecretMetadata, client_security
from tensorwire.errors import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    TensorwireError,
    UnavailableError,
    error_class,
)
from tensorwire.targets import ROUND_ROBIN, Target, parse_target, pinned, replicas
from tensorwire.types import (
    DeviceInfo,
    DynamicBatching,
    GradResult,
    ModelInfo,
    ModelVersion,
    Progress,
    ProgressCallback,
    ServerInfo,
    SessionInfo,
    SessionsSummary,
    TensorSpec,
    VersionStatistics,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import streaming
from tensorwire.wire.codec import Encoder, Handle, Received, Ref, as_handle, receiver
from tensorwire.wire.dtypes import NAME_BY_WIRE
from tensorwire.wire.protocol import CHANNEL_OPTIONS, SESSION_KEY
from tensorwire.wire.streaming import DEFAULT_CHUNK_SIZE, Advance, StreamReceiver

if TYPE_CHECKING:
    from tensorwire.remote import Program

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


@dataclass(frozen=True)
class MethodSpec:
    """What a TensorService method answers and how it may be sent."""

    #: The response message.
    response: type[Message]
    #: It has a ``<name>Stream`` twin for messages too large for one.
    streamed: bool
    #: Sending it twice does no harm (its answer is a pure function of the request),
    #: so an attempt that reached no server may be made again.
    idempotent: bool


#: Every TensorService method the clients call; a ``<name>Stream`` twin shares its entry.
#: Load and Unload change what the server serves, so they are never sent again on
#: their own: a Load made twice reads the model from disk twice (and may pick up a
#: folder changed in between), and an Unload made twice answers NOT_FOUND. Whoever
#: administers the server decides whether to repeat them.
METHODS: Final[dict[str, MethodSpec]] = {
    "Info": MethodSpec(pb.InfoResponse, streamed=False, idempotent=True),
    "Infer": MethodSpec(pb.InferResponse, streamed=True, idempotent=True),
    "Grad": MethodSpec(pb.GradResponse, streamed=True, idempotent=True),
    "Call": MethodSpec(pb.CallResponse, streamed=True, idempotent=True),
    "ModelStatistics": MethodSpec(pb.ModelStatisticsResponse, streamed=False, idempotent=True),
    "Load": MethodSpec(pb.LoadResponse, streamed=False, idempotent=False),
    "Unload": MethodSpec(pb.UnloadResponse, streamed=False, idempotent=False),
    # Sessions. What creates, frees or changes state is never sent twice: a Put made
    # twice holds the tensor twice, a Step made twice trains twice. Infer, Grad and
    # Call with keep, and Run with keep, make handles: each call says so (``_Via``).
    "OpenSession": MethodSpec(pb.OpenSessionResponse, streamed=False, idempotent=False),
    "CloseSession": MethodSpec(pb.CloseSessionResponse, streamed=False, idempotent=False),
    "DescribeSession": MethodSpec(pb.DescribeSessionResponse, streamed=False, idempotent=True),
    "Put": MethodSpec(pb.PutResponse, streamed=True, idempotent=False),
    "Get": MethodSpec(pb.GetResponse, streamed=True, idempotent=True),
    "Free": MethodSpec(pb.FreeResponse, streamed=False, idempotent=False),
    "Run": MethodSpec(pb.RunResponse, streamed=False, idempotent=False),
    "CreateTrainer": MethodSpec(pb.CreateTrainerResponse, streamed=False, idempotent=False),
    "Step": MethodSpec(pb.StepResponse, streamed=False, idempotent=False),
    "Parameters": MethodSpec(pb.ParametersResponse, streamed=False, idempotent=True),
}

#: The response message of each TensorService method.
RESPONSES: Final[dict[str, type[Message]]] = {n: s.response for n, s in METHODS.items()}

#: The methods that carry tensors; each has a ``<name>Stream`` twin for large messages.
STREAMED: Final = tuple(name for name, spec in METHODS.items() if spec.streamed)

#: Requests with at least this many payload bytes travel as a stream. Measured on
#: loopback (docs/performance.md): below it the unary path's lower setup cost wins.
DEFAULT_STREAM_THRESHOLD: Final = 2 << 20

#: The status codes worth another attempt. UNAVAILABLE means no server took the call
#: (refused, reset, starting up, draining). CANCELLED reaches a client only from the
#: other end: a server (or gRPC inside it) stopping with the call in flight. The
#: client's own cancellations never come back as a status (asyncio raises
#: CancelledError; a closed client raises RuntimeError). Every other status is an
#: answer (a bad request, no memory) or the caller's own limit (DEADLINE_EXCEEDED),
#: which sending again would not change.
RETRY_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

#: Seconds ``close`` waits for CloseSession, and a check for a lost session waits.
SESSION_CALL_TIMEOUT: Final = 2.0

#: Attempts made after the first, by default, when one fails with a RETRY_CODES status.
DEFAULT_RETRIES: Final = 4

#: Backoff before retry n: up to BACKOFF_INITIAL * BACKOFF_MULTIPLIER**(n-1) seconds,
#: never more than BACKOFF_MAX (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2, ...).
BACKOFF_INITIAL: Final = 0.05
BACKOFF_MULTIPLIER: Final = 2.0
BACKOFF_MAX: Final = 2.0


def backoff(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...), with "full jitter":
    uniform below the exponential ceiling, so that clients cut off together by one
    failure do not all come back at the same instant."""
    ceiling = BACKOFF_INITIAL * BACKOFF_MULTIPLIER ** min(max(retry - 1, 0), 64)
    return rand() * min(BACKOFF_MAX, ceiling)


def method_path(name: str) -> str:
    """The gRPC path of a TensorService method."""
    return f"/{SERVICE.full_name}/{name}"


def _tensor(value: Any) -> np.ndarray | Handle:
    """An array to send, or the Handle of a remote tensor (sent as a handle)."""
    handle = as_handle(value)
    return np.asarray(value) if handle is None else handle


def _named_inputs(inputs: Inputs) -> list[tuple[str, np.ndarray | Handle]]:
    if isinstance(inputs, np.ndarray):
        return [("", inputs)]
    if isinstance(inputs, Mapping):
        return [(str(name), _tensor(value)) for name, value in inputs.items()]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
        return [("", _tensor(value)) for value in inputs]
    return [("", _tensor(inputs))]


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


class _Retry(Exception):
    """Ends an attempt that should be made again after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


@dataclass
class _Call:
    """One method call across its attempts: what it sends and how far it got."""

    method: str
    encoder: Encoder[Any]
    reporter: _Reporter
    deadline: float | None
    #: It goes to the ``<method>Stream`` twin: a large request, or a response found
    #: too large for one message (then every later attempt streams too).
    streamed: bool
    attempts: int = 0
    #: The current attempt received response data: it must not be made again.
    responded: bool = False
    #: The details of the last UNAVAILABLE, for the error should a later attempt time out.
    unavailable: str | None = None
    #: The method callables its attempts use (``_methods``, or the pinned replica's).
    methods: dict[str, Any] = field(default_factory=dict)
    #: The call metadata: the client's own, and its session's id when it has one.
    metadata: Any = None
    #: An attempt that reached no server may be made again.
    idempotent: bool = False

    def remaining(self) -> float | None:
        """Seconds left of the whole call's deadline (None: no deadline)."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    # grpc.Call (sync) and grpc.aio.AioRpcError share code() and details() but no base.
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(exc: grpc.RpcError) -> str:
    return (exc.details() if hasattr(exc, "details") else None) or str(exc)


def _spec(spec: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        spec.name,
        NAME_BY_WIRE.get(spec.dtype),
        None if spec.any_shape else tuple(spec.shape),
    )


def _statistics(m: pb.VersionStatistics) -> VersionStatistics:
    return VersionStatistics(
        model=m.model,
        version=m.version,
        requests=m.request_count,
        failures=m.failure_count,
        inferences=m.inference_count,
        executions=m.execution_count,
        queue_seconds=m.queue_seconds,
        compute_seconds=m.compute_seconds,
        batch_sizes=dict(sorted(m.batch_sizes.items())),
        rejected=m.rejected_count,
        expired=m.expired_count,
    )


def _sessions(m: pb.SessionsSummary) -> SessionsSummary:
    return SessionsSummary(
        count=m.count,
        bytes=m.bytes,
        quota_bytes=m.quota_bytes,
        ttl_seconds=m.ttl_seconds,
        max_sessions=m.max_sessions,
        losses=tuple(m.losses),
        optimizers=tuple(m.optimizers),
    )


def _model_info(m: pb.ModelInfo) -> ModelInfo:
    batching = None
    if m.HasField("dynamic_batching"):
        batching = DynamicBatching(
            m.dynamic_batching.max_queue_delay_seconds,
            tuple(m.dynamic_batching.preferred_batch_sizes),
        )
    return ModelInfo(
        m.name,
        m.kind,
        m.description,
        tuple(_spec(s) for s in m.inputs),
        tuple(_spec(s) for s in m.outputs),
        m.variadic,
        m.parameter_count,
        # A server from before model states lists only models that serve.
        state=m.state or "READY",
        reason=m.reason,
        versions=tuple(
            ModelVersion(
                v.version,
                v.state,
                v.reason,
                _statistics(v.statistics) if v.HasField("statistics") else None,
            )
            for v in m.versions
        ),
        max_batch_size=m.max_batch_size,
        dynamic_batching=batching,
        instances=tuple(m.instances),
        precision=m.precision,
        max_queue_size=m.max_queue_size,
    )


class BaseClient:
    """Target, timeout, retries, credentials, and the encode/decode halves of every
    method; ``_GRPC`` (grpc or grpc.aio) makes the channel."""

    _GRPC: ClassVar[Any]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        retries: int = DEFAULT_RETRIES,
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        server_name: str | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of bytes, not {chunk_size}")
        if retries < 0:
            raise ValueError(f"retries must be 0 (no retries) or more, not {retries}")
        where = parse_target(target)
        credentials, security_options, metadata = client_security(
            where.channel,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name=server_name,
            token=token,
            credentials=credentials,
        )
        self.timeout = timeout
        self.retries = retries
        self.stream_threshold = stream_threshold
        self.chunk_size = chunk_size
        self._secure = credentials is not None
        self._metadata = metadata or None
        self._closed = False
        self._credentials = credentials
        self._options = [*security_options, *options]
        self._connect(where)

    def _connect(self, where: Target) -> None:
        """Open the channel to ``where``; the one-replica channel opens when first
        needed (``_pinned_methods``)."""
        self.target = where.name
        self._where = where
        self._channel = self._open_channel(where)
        self._methods = self._bind_methods(self._channel)
        self._pin_lock = threading.Lock()
        # The replica chosen, its methods, and its own channel (None: self._channel).
        self._pinned: tuple[Target, dict[str, Any], Any] | None = None
        self._reset_session()

    def __repr__(self) -> str:
        # Never the token: reprs end up in logs and tracebacks.
        token = ", token=<hidden>" if self._metadata else ""
        closed = ", closed" if self._closed else ""
        return f"{type(self).__name__}({self.target!r}, secure={self._secure}{token}{closed})"

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed

    def _open_channel(self, where: Target) -> Any:
        """A channel to ``where`` from ``_GRPC`` (grpc and grpc.aio share these two
        calls), balancing round robin over the addresses the target resolves to."""
        ours: list[tuple[str, Any]] = [*CHANNEL_OPTIONS, *CLIENT_OPTIONS]
        given = {key for key, _ in self._options}
        if not given & {"grpc.service_config", "grpc.lb_policy_name"}:
            ours.append(("grpc.service_config", ROUND_ROBIN))
        # server_name's override names the server itself; gRPC refuses calls whose
        # :authority differs from it.
        if where.authority is not None and "grpc.ssl_target_name_override" not in given:
            ours.append(("grpc.default_authority", where.authority))
        # One value per key, the last given winning: the caller's over ours.
        opts = list(dict([*ours, *self._options]).items())
        if self._credentials is not None:
            return self._GRPC.secure_channel(where.channel, self._credentials, options=opts)
        return self._GRPC.insecure_channel(where.channel, options=opts)

    def _pin(self) -> tuple[Target, dict[str, Any], Any]:
        """The replica this client's stateful calls go to, chosen once, at random,
        among the addresses the target resolves to; the target itself when it reaches
        one server only."""
        with self._pin_lock:
            if self._pinned is None:
                found = replicas(self._where)
                if not found:
                    self._pinned = (self._where, self._methods, None)
                else:
                    where = pinned(self._where, random.choice(found))
                    channel = self._open_channel(where)
                    self._pinned = (where, self._bind_methods(channel), channel)
            return self._pinned

    def _pinned_methods(self) -> dict[str, Any]:
        """Like ``_methods``, bound to a channel that reaches one replica only, the same
        one for the client's whole life: calls that create or name state held by one
        server (handles, sessions) go through these, so they find it. A retried call
        goes to the same replica. With a target of one server: ``_methods`` itself."""
        self._check_open()
        return self._pin()[1]

    def _channels(self) -> list[Any]:
        """Every channel this client opened, for ``close``."""
        pinned_channel = None if self._pinned is None else self._pinned[2]
        return [self._channel] if pinned_channel is None else [self._channel, pinned_channel]

    def pin(self) -> Self:
        """A new client with this one's settings whose calls all go to one replica:
        the one this client sends its stateful calls to (chosen once, at random, among
        the addresses its target resolves to; a target of one server: that server).
        Handles and sessions live on one replica: make them through a pinned client,
        or with the methods that create them, which pin by themselves. Close it on
        its own; it keeps the target's name for TLS."""
        self._check_open()
        clone = copy.copy(self)
        clone._closed = False
        clone._connect(self._pin()[0])
        return clone

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

    # ------------------------------------------------------------ attempts

    def _begin(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None,
        via: _Via | None = None,
    ) -> _Call:
        """A new call of ``method``; its deadline covers every attempt and backoff.
        ``via``: a stateful call's route (replica, session, retries); None: stateless."""
        self._check_open()
        seconds = self._timeout(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        spec = METHODS[method]
        if via is None:
            via = _Via(self._methods, self._metadata)
        streamed = spec.streamed and (via.stream or self._wants_stream(encoder))
        idempotent = spec.idempotent if via.idempotent is None else via.idempotent
        return _Call(
            method,
            encoder,
            _Reporter(progress),
            deadline,
            streamed,
            methods=via.methods,
            metadata=via.metadata,
            idempotent=idempotent,
        )

    def _next_attempt(self, call: _Call) -> None:
        self._check_open()  # closed while backing off
        call.attempts += 1
        call.responded = False

    def _unary_done(self, call: _Call, result: Received[M] | TensorwireError) -> Received[M]:
        received = self._unwrap(result)
        call.reporter.whole(call.encoder, received)
        return received

    def _unary_failed(self, call: _Call, exc: grpc.RpcError) -> None:
        """Return when the response was only too large for one message, having
        switched ``call`` to the stream; else raise the error, or _Retry."""
        if _code(exc) is grpc.StatusCode.OUT_OF_RANGE and METHODS[call.method].streamed:
            call.streamed = True
            return
        self._retry_or_raise(call, exc)

    def _stream_parts(self, call: _Call) -> tuple[Iterator[bytes], StreamReceiver[Any]]:
        """The request parts of a streamed attempt and the receiver for its response;
        every attempt sends the request from its start, and reports progress from 0."""
        reporter = call.reporter
        parts = streaming.parts(call.encoder, self.chunk_size, reporter.stage("upload"))
        return parts, StreamReceiver(RESPONSES[call.method], advance=reporter.stage("download"))

    def _stream_failed(self, call: _Call, exc: BaseException) -> NoReturn:
        """Raise what a streamed attempt that failed with ``exc`` raises, or _Retry."""
        error = call.reporter.error
        if error is not None and error is not exc:
            # The progress callback raised while gRPC was taking the upload, which
            # cancelled the call: the callback's error is the one to report.
            raise error from None
        if isinstance(exc, grpc.RpcError):
            self._retry_or_raise(call, exc)
        raise exc

    def _retry_or_raise(self, call: _Call, exc: grpc.RpcError) -> NoReturn:
        """Raise _Retry when ``call`` may be made again, after a backoff that ends
        before its deadline; else the error ``exc`` maps to."""
        if (
            _code(exc) in RETRY_CODES
            and call.idempotent
            and not call.responded  # the server answered in part: it was reached
            and call.attempts <= self.retries
        ):
            call.unavailable = _details(exc)
            delay = backoff(call.attempts)
            if call.deadline is None or time.monotonic() + delay < call.deadline:
                raise _Retry(delay)
        raise self._error(exc, call) from exc

    def _error(self, exc: grpc.RpcError, call: _Call) -> TensorwireError:
        code = _code(exc)
        details = _details(exc)
        cls = error_class(code.name)
        if code is grpc.StatusCode.UNAVAILABLE:
            details = self._unreachable(details, call.attempts)
        elif cls is UnavailableError:
            details = f"{self.target}: {details}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and call.unavailable is not None:
            # The time ran out on a retry: say why there were retries at all.
            before = self._unreachable(call.unavailable, 1)
            details = f"{details} on attempt {call.attempts}; before it: {before}"
        return cls(details)

    def _unreachable(self, details: str, attempts: int) -> str:
        tried = f" (after {attempts} attempts)" if attempts > 1 else ""
        return f"cannot reach tensorwire server at {self.target}: {details}{tried}"

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
            models={model.name: _model_info(model) for model in m.models},
            functions={f.name: f.description for f in m.functions},
            sessions=_sessions(m.sessions) if m.HasField("sessions") else None,
        )

    # ------------------------------------------------------------------ Infer

    @staticmethod
    def _prepare_infer(
        model: str,
        inputs: Inputs,
        outputs: Sequence[str] | None,
        version: int = 0,
        keep: bool = False,
    ) -> Encoder[pb.InferRequest]:
        request = pb.InferRequest(
            model=model, outputs=list(outputs or ()), version=_version(version), keep=keep
        )
        encoder = Encoder(request)
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
        version: int = 0,
        keep: bool = False,
    ) -> Encoder[pb.GradRequest]:
        request = pb.GradRequest(
            model=model,
            param_grads=param_grads,
            wrt=_names(wrt),
            model_version=_version(version),
            keep=keep,
        )
        encoder = Encoder(request)
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
        function: str, args: Sequence[Any], kwargs: Mapping[str, Any], keep: bool = False
    ) -> Encoder[pb.CallRequest]:
        encoder = Encoder(pb.CallRequest(function=function, keep=keep))
        _arguments(encoder, args, kwargs)
        return encoder

    @staticmethod
    def _finish_call(received: Received[pb.CallResponse]) -> np.ndarray | tuple[np.ndarray, ...]:
        outputs = tuple(_owned(received, received.message.outputs).values())
        return outputs[0] if len(outputs) == 1 else outputs

    # ------------------------------------------------------------------ ModelStatistics

    @staticmethod
    def _prepare_model_statistics(model: str, version: int) -> Encoder[pb.ModelStatisticsRequest]:
        return Encoder(pb.ModelStatisticsRequest(model=model, version=_version(version)))

    @staticmethod
    def _finish_model_statistics(
        received: Received[pb.ModelStatisticsResponse],
    ) -> list[VersionStatistics]:
        return [_statistics(s) for s in received.message.statistics]

    # ------------------------------------------------------------------ Load, Unload

    @staticmethod
    def _prepare_load_model(model: str) -> Encoder[pb.LoadRequest]:
        return Encoder(pb.LoadRequest(model=model))

    @staticmethod
    def _finish_load_model(received: Received[pb.LoadResponse]) -> ModelInfo:
        return _model_info(received.message.model)

    @staticmethod
    def _prepare_unload_model(model: str, version: int) -> Encoder[pb.UnloadRequest]:
        return Encoder(pb.UnloadRequest(model=model, version=_version(version)))

    @staticmethod
    def _finish_unload_model(received: Received[pb.UnloadResponse]) -> None:
        return None

    # ------------------------------------------------------------------ sessions
    #
    # A client opens one session, lazily, on the first call that needs one: a call
    # naming a remote tensor, keeping its results, running a program or a trainer.
    # Every such call goes to one replica (``_pinned_methods``) with the session's id
    # in its metadata (``_via``); the twins hold the loops: open under a lock, flush
    # the ids garbage collection queued, call, and on NOT_FOUND ask whether the
    # session itself is gone (``_session_lost``).

    @staticmethod
    def _new_lock() -> Any:
        """The lock that serializes opening the session (AsyncClient: asyncio's)."""
        return threading.Lock()

    def _reset_session(self) -> None:
        """No session yet: the first call that needs one opens it."""
        self._session: SessionState | None = None
        self._session_lock = self._new_lock()

    def _via(
        self, session: SessionState | None, *, idempotent: bool | None = None, stream: bool = False
    ) -> _Via:
        """The route of a stateful call: the pinned replica, the session's metadata."""
        metadata = self._metadata if session is None else session.metadata
        return _Via(self._pinned_methods(), metadata, idempotent, stream)

    def _uses_session(self, *values: Any) -> bool:
        """Whether ``values`` hold remote tensors (also inside sequences and mappings),
        having checked that each is this client's and usable."""
        found = False
        for value in _remote_values(values):
            if isinstance(value, Held):
                value._usable(self)
            found = True
        return found

    def _session_lost(self, session: SessionState) -> NotFoundError:
        """The error for a call whose session the server no longer has; the client's
        next stateful call opens a new one, and the old one's tensors stay unusable."""
        session.ended = "expired on the server"
        if self._session is session:  # a new one opens only once this is None
            self._session = None
        return NotFoundError(
            f"the server at {self.target} no longer has this client's session (unused "
            f"for longer than its {session.ttl_seconds:g} s TTL, or the server restarted): "
            "its tensors and trainers are gone. The next call opens a new session."
        )

    def _to_free(self, items: Sequence[Any]) -> tuple[SessionState | None, list[str]]:
        """The session and ids of ``items`` the server must free, marking each freed."""
        session = None
        ids: list[str] = []
        for item in items:
            if not isinstance(item, Held):
                raise TypeError(f"free takes remote tensors and trainers, not {type(item)}")
            if item._client is not self:
                raise ValueError(f"{item!r} belongs to another client: {item._client!r}")
            if item._release():
                session = item._session
                ids.append(item._id)
        return session, ids

    @staticmethod
    def _prepare_open_session() -> Encoder[pb.OpenSessionRequest]:
        return Encoder(pb.OpenSessionRequest())

    def _finish_open_session(self, received: Received[pb.OpenSessionResponse]) -> SessionState:
        m = received.message
        metadata = SecretMetadata((*(self._metadata or ()), (SESSION_KEY, m.session)))
        return SessionState(m.session, m.quota_bytes, m.ttl_seconds, metadata)

    @staticmethod
    def _prepare_close_session() -> Encoder[pb.CloseSessionRequest]:
        return Encoder(pb.CloseSessionRequest())

    @staticmethod
    def _prepare_describe_session() -> Encoder[pb.DescribeSessionRequest]:
        return Encoder(pb.DescribeSessionRequest())

    @staticmethod
    def _finish_describe_session(
        received: Received[pb.DescribeSessionResponse],
    ) -> SessionInfo:
        m = received.message
        return SessionInfo(
            session=m.session,
            handles=tuple(received.handle(t, f"handle {i}") for i, t in enumerate(m.handles)),
            trainers=tuple(m.trainers),
            bytes=m.bytes,
            quota_bytes=m.quota_bytes,
            ttl_seconds=m.ttl_seconds,
        )

    @staticmethod
    def _prepare_put(value: Any) -> Encoder[pb.PutRequest]:
        encoder = Encoder(pb.PutRequest())
        encoder.tensor(encoder.message.tensor, _tensor(value))
        return encoder

    @staticmethod
    def _finish_put(received: Received[pb.PutResponse]) -> Handle:
        return _handles(received, [("tensor", received.message.tensor)])[0][1]

    @staticmethod
    def _prepare_get(handle: Handle) -> Encoder[pb.GetRequest]:
        return Encoder(pb.GetRequest(handle=handle.id))

    @staticmethod
    def _finish_get(received: Received[pb.GetResponse]) -> np.ndarray:
        arr = received.array(received.message.tensor, "tensor")
        if not isinstance(arr, np.ndarray):
            raise InternalError("Get answered a handle instead of the tensor's data")
        # A stream's buffer is private; gRPC's bytes are not: then one copy.
        return arr if received.owned else np.array(arr)

    @staticmethod
    def _prepare_free(ids: Sequence[str]) -> Encoder[pb.FreeRequest]:
        return Encoder(pb.FreeRequest(handles=list(ids)))

    @staticmethod
    def _prepare_run(
        program: Program,
        inputs: Mapping[str, Any],
        outputs: Sequence[Ref | str] | None,
        loss: Ref | str | None,
        wrt: Ref | str | Sequence[Ref | str] | None,
        keep: bool,
    ) -> Encoder[pb.RunRequest]:
        program._check_inputs(inputs)
        if isinstance(wrt, Ref | str):
            wrt = [wrt]
        request = pb.RunRequest(
            outputs=[ref_name(r) for r in outputs or ()],
            loss="" if loss is None else ref_name(loss),
            wrt=[ref_name(r) for r in wrt or ()],
            keep=keep,
        )
        encoder = Encoder(request)
        for name, value in inputs.items():
            encoder.named(request.inputs.add(), name, _tensor(value))
        for step in program._steps:
            out = request.steps.add(name=step.name, version=_version(step.version))
            if step.model:
                out.model = step.model
            else:
                out.function = step.function
            _arguments(encoder, step.args, step.kwargs, out, f"step {step.name!r} ")
        return encoder

    @staticmethod
    def _prepare_trainer(
        model: str,
        version: int,
        optimizer: str,
        options: Mapping[str, Any],
        loss: str,
        loss_options: Mapping[str, Any] | None,
    ) -> Encoder[pb.CreateTrainerRequest]:
        request = pb.CreateTrainerRequest(model=model, version=_version(version), loss=loss)
        request.optimizer.name = optimizer
        encoder = Encoder(request)
        for key, value in options.items():
            if value is not None:
                encoder.value(request.optimizer.options[key], value, f"option {key!r}")
        for key, value in (loss_options or {}).items():
            encoder.value(request.loss_options[key], value, f"loss option {key!r}")
        return encoder

    @staticmethod
    def _prepare_step(
        trainer: str, inputs: Inputs, target: Any, output: str | None
    ) -> Encoder[pb.StepRequest]:
        encoder = Encoder(pb.StepRequest(trainer=trainer, output=output or ""))
        for name, arr in _named_inputs(inputs):
            encoder.named(encoder.message.inputs.add(), name, arr)
        encoder.tensor(encoder.message.target, _tensor(target))
        return encoder

    @staticmethod
    def _prepare_parameters(trainer: str) -> Encoder[pb.ParametersRequest]:
        return Encoder(pb.ParametersRequest(trainer=trainer))

    @staticmethod
    def _finish_parameters(received: Received[pb.ParametersResponse]) -> dict[str, np.ndarray]:
        return _owned(received, received.message.parameters)


@dataclass(frozen=True)
class _Via:
    """How a call travels: the method callables (a replica's), its metadata, whether
    it may be made again (None: as METHODS says), and whether to stream at once (a
    response known to be large)."""

    methods: dict[str, Any]
    metadata: Any
    idempotent: bool | None = None
    stream: bool = False


def ref_name(ref: Ref | str) -> str:
    """The wire name of a program ref given as a Ref or a string."""
    return ref.name if isinstance(ref, Ref) else str(ref)


def _remote_values(value: Any) -> Iterator[Any]:
    """Every remote tensor (anything with a Handle) in ``value``, through tuples,
    lists and mapping values."""
    if as_handle(value) is not None:
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _remote_values(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _remote_values(item)


def _handles(
    received: Received[Any], tensors: Iterable[tuple[str, pb.Tensor]]
) -> list[tuple[str, Handle]]:
    """The handles a response holds for results kept on the server."""
    found = []
    for name, tensor in tensors:
        handle = received.array(tensor, name)
        if not isinstance(handle, Handle):
            raise InternalError(
                f"{name}: the server answered data where a handle was asked for (keep)"
            )
        found.append((name, handle))
    return found


def _kept(received: Received[Any], tensors: Sequence[pb.NamedTensor]) -> list[tuple[str, Handle]]:
    """The handles of a response's NamedTensors, by name (keep=True)."""
    return _handles(received, ((nt.name or str(i), nt.tensor) for i, nt in enumerate(tensors)))


def _version(version: int) -> int:
    """``version`` checked before sending, as the codec checks tensors: a whole number
    from 0 (the newest, or every version, as the method says) to the int64 limit."""
    if (
        isinstance(version, bool)
        or not isinstance(version, int | np.integer)
        or not 0 <= version < 1 << 63
    ):
        raise InvalidArgumentError(f"version must be a whole number, 0 or more, not {version!r}")
    return int(version)


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
        encoder.named(request.grad_outputs.add(), "", _tensor(grad_outputs))
        return
    for name, value in grad_outputs.items():
        encoder.named(request.grad_outputs.add(), str(name), _tensor(value))


def _arguments(
    encoder: Encoder[Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    request: Any = None,
    where: str = "",
) -> None:
    """Encode Call arguments into ``request`` (default: the encoder's message)."""
    request = encoder.message if request is None else request
    for i, arg in enumerate(args):
        encoder.value(request.args.add(), arg, f"{where}argument {i}")
    for key, arg in kwargs.items():
        encoder.value(request.kwargs[key], arg, f"{where}argument {key!r}")
