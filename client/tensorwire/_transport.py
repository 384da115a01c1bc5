"""The client's transport: channels, replicas and pinning, the policy table of every
method, retries with backoff, streaming the large, and gRPC errors mapped to
tensorwire's.

Client and AsyncClient differ only in how they wait for gRPC, so every decision
about a call is made here once: whether it streams, whether and when a failed attempt
is made again, and what error the caller sees. The twins keep only their loops:
``time.sleep`` against ``await asyncio.sleep``.
"""

from __future__ import annotations

import copy
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, NoReturn, Self, TypeVar

import grpc
from google.protobuf.message import Message

from tensorwire._dataplane import DataRoute, DataRoutes, tls_context
from tensorwire._flow import Route, Send
from tensorwire.channel import CLIENT_OPTIONS, Pem, client_security, read_pem
from tensorwire.errors import TensorwireError, UnavailableError, error_class
from tensorwire.targets import ROUND_ROBIN, Target, parse_target, pinned, replicas
from tensorwire.types import Progress, ProgressCallback, UseClientDefault
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import streaming
from tensorwire.wire.codec import Encoder, Received, receiver
from tensorwire.wire.protocol import CHANNEL_OPTIONS, REQUEST_ID_KEY, RETRY_PUSHBACK_KEY
from tensorwire.wire.streaming import DEFAULT_CHUNK_SIZE, Advance, StreamReceiver

M = TypeVar("M", bound=Message)
SERVICE: Final = pb.DESCRIPTOR.services_by_name["TensorService"]


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
    # Call with keep, and Run with keep, make handles: each call says so (its Route).
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


class Reporter:
    """Turns byte counts into Progress calls, and keeps the callback's own exception
    so that it, not the cancellation it causes, is what the caller sees."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.error: BaseException | None = None

    def stage(self, stage: Literal["upload", "download"]) -> Advance | None:
        """The Advance callback of one direction of a streamed call (None: no callback)."""
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


class Retry(Exception):
    """Ends an attempt that should be made again after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


@dataclass
class CallState:
    """One method call across its attempts: what it sends and how far it got."""

    method: str
    encoder: Encoder[Any]
    reporter: Reporter
    deadline: float | None
    #: It goes to the ``<method>Stream`` twin: a large request, or a response found
    #: too large for one message (then every later attempt streams too).
    streamed: bool
    attempts: int = 0
    #: The current attempt received response data: it must not be made again.
    responded: bool = False
    #: The details of the last UNAVAILABLE, for the error should a later attempt time out.
    unavailable: str | None = None
    #: The details of the last "not yet, ask again" (pushback) from a starting server.
    starting: str | None = None
    #: Attempts the server pushed back: they count against no retry budget.
    pushed_back: int = 0
    #: The method callables its attempts use (``_methods``, or the pinned replica's).
    methods: dict[str, Any] = field(default_factory=dict)
    #: The call metadata: the client's own, and its session's id when it has one.
    metadata: Any = None
    #: An attempt that reached no server may be made again.
    idempotent: bool = False

    def remaining(self) -> float | None:
        """Seconds left of the whole call's deadline (None: no deadline)."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


# What grpc.aio reports when one of its own batch operations fails, e.g. sending on a
# connection the server's process dropped (grpc's cygrpc ``set_internal_error``). No
# server said it: it is the transport breaking, so it is read as UNAVAILABLE.
_CORE_FAILURE: Final = "Internal error from Core"


def _core_failure(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    return code is grpc.StatusCode.INTERNAL and details == _CORE_FAILURE


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    # grpc.Call (sync) and grpc.aio.AioRpcError share code() and details() but no base.
    if _core_failure(exc):
        return grpc.StatusCode.UNAVAILABLE
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(exc: grpc.RpcError) -> str:
    if _core_failure(exc):
        return "the connection to the server broke during the call"
    return (exc.details() if hasattr(exc, "details") else None) or str(exc)


def _metadata(exc: grpc.RpcError, wanted: str) -> str | None:
    """The value of metadata key ``wanted`` the server ended ``exc``'s call with: in its
    trailing metadata, else its initial metadata; None when no server sent it."""
    for which in ("trailing_metadata", "initial_metadata"):
        read = getattr(exc, which, None)
        if read is None:
            continue
        try:
            metadata = read()
        except Exception:  # a call that never started has none to give
            continue
        for key, value in metadata or ():
            if key == wanted:
                return value.decode() if isinstance(value, bytes) else str(value)
    return None


def request_id(exc: grpc.RpcError) -> str | None:
    """The ``x-request-id`` the server answered ``exc``'s call with; None when no
    server answered."""
    return _metadata(exc, REQUEST_ID_KEY)


def pushback(exc: grpc.RpcError) -> float | None:
    """Seconds the server asked to wait before trying ``exc``'s call again (gRPC's
    server pushback), when it answered UNAVAILABLE without running it; else None."""
    if _code(exc) is not grpc.StatusCode.UNAVAILABLE:
        return None
    value = _metadata(exc, RETRY_PUSHBACK_KEY)
    if value is None or not value.isdigit():  # gRFC A6: a negative or bad one means "don't"
        return None
    return min(int(value) / 1000, BACKOFF_MAX)


class Transport:
    """Target, timeout, retries, credentials, channels and attempts; ``_GRPC`` (grpc or
    grpc.aio) makes the channel."""

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
        data_plane: bool = True,
        same_host: bool = True,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of bytes, not {chunk_size}")
        if retries < 0:
            raise ValueError(f"retries must be 0 (no retries) or more, not {retries}")
        where = parse_target(target)
        given_credentials = credentials is not None
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
        # The data plane's TLS is Python's own: made from the same certificates, and
        # not to be had when credentials= hides them (payloads then stay in gRPC).
        self._data_on = data_plane and not given_credentials
        self._data_tls: ssl.SSLContext | None = None
        if self._data_on and credentials is not None:
            self._data_tls = tls_context(
                read_pem(root_certificates, "root_certificates"),
                read_pem(certificate_chain, "certificate_chain"),
                read_pem(private_key, "private_key"),
            )
        self._server_name = server_name
        self._same_host = same_host
        self._connect(where)

    def _connect(self, where: Target) -> None:
        """Open the channel to ``where``; the one-replica channel opens when first
        needed (``_pinned_methods``)."""
        self.target = where.name
        self._where = where
        self._channel = self._open_channel(where)
        self._methods = self._bind_methods(self._channel)
        self._data = DataRoutes(
            where,
            self._data_on,
            self._data_tls,
            self._server_name,
            self._same_host,
            self._open_channel,
            self._bind_methods,
        )
        self._pin_lock = threading.Lock()
        # The replica chosen, its methods, and its own channel (None: self._channel).
        self._pinned: tuple[Target, dict[str, Any], Any] | None = None

    def __repr__(self) -> str:
        # Never the token: reprs end up in logs and tracebacks.
        token = ", token=<hidden>" if self._metadata else ""
        closed = ", closed" if self._closed else ""
        return f"{type(self).__name__}({self.target!r}, secure={self._secure}{token}{closed})"

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed

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

    # ------------------------------------------------------------ channels

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

    def _release(self) -> list[Any]:
        """Close every data connection; every channel this client opened, which
        ``close`` closes (each twin its own way)."""
        pinned_channel = None if self._pinned is None else self._pinned[2]
        channels = [self._channel] if pinned_channel is None else [self._channel, pinned_channel]
        return channels + self._data.close()

    def _data_route(self, call: CallState) -> DataRoute | None:
        """Where a streamed attempt goes when its payloads take the data plane (None:
        they go through gRPC): see DataRoutes.route."""
        session = self._pinned
        of_session = session is not None and call.methods is session[1]
        return self._data.route(
            call.methods,
            balanced=call.methods is self._methods,
            session=session[0] if session is not None and of_session else None,
        )

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

    # ------------------------------------------------------------ attempts

    def _begin(self, send: Send) -> CallState:
        """A new call as ``send`` describes it; its deadline covers every attempt and
        backoff."""
        self._check_open()
        timeout = send.timeout
        seconds = self.timeout if isinstance(timeout, UseClientDefault) else timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        spec = METHODS[send.method]
        route = send.route or Route(self._methods, self._metadata)
        streamed = spec.streamed and (
            route.stream or send.encoder.payload_bytes >= self.stream_threshold
        )
        idempotent = spec.idempotent if route.idempotent is None else route.idempotent
        return CallState(
            send.method,
            send.encoder,
            Reporter(send.progress),
            deadline,
            streamed,
            methods=route.methods,
            metadata=route.metadata,
            idempotent=idempotent,
        )

    def _next_attempt(self, call: CallState) -> None:
        self._check_open()  # closed while backing off
        call.attempts += 1
        call.responded = False

    def _unary_done(self, call: CallState, result: Received[M] | TensorwireError) -> Received[M]:
        if isinstance(result, TensorwireError):
            raise result
        call.reporter.whole(call.encoder, result)
        return result

    def _unary_failed(self, call: CallState, exc: grpc.RpcError) -> None:
        """Return when the response was only too large for one message, having
        switched ``call`` to the stream; else raise the error, or Retry."""
        if _code(exc) is grpc.StatusCode.OUT_OF_RANGE and METHODS[call.method].streamed:
            call.streamed = True
            return
        self._retry_or_raise(call, exc)

    def _stream_parts(self, call: CallState) -> tuple[Iterator[bytes], StreamReceiver[Any]]:
        """The request parts of a streamed attempt and the receiver for its response;
        every attempt sends the request from its start, and reports progress from 0."""
        parts = streaming.parts(call.encoder, self.chunk_size, call.reporter.stage("upload"))
        return parts, self._receiver(call)

    def _data_parts(self, call: CallState) -> tuple[bytes, list[memoryview], Iterator[bytes]]:
        """For a streamed attempt over the data plane: the header part, the payloads
        the data connection carries, and the chunk parts that carry them should the
        data port prove unreachable."""
        header, payloads = call.encoder.header()
        upload = call.reporter.stage("upload")
        chunks = streaming.chunk_parts(payloads, self.chunk_size, upload)
        return streaming.header_part(header), payloads, chunks

    @staticmethod
    def _receiver(call: CallState) -> StreamReceiver[Any]:
        """The receiver of a streamed attempt's response, reporting progress from 0."""
        return StreamReceiver(RESPONSES[call.method], advance=call.reporter.stage("download"))

    def _stream_failed(self, call: CallState, exc: BaseException) -> NoReturn:
        """Raise what a streamed attempt that failed with ``exc`` raises, or Retry."""
        error = call.reporter.error
        if error is not None and error is not exc:
            # The progress callback raised while gRPC was taking the upload, which
            # cancelled the call: the callback's error is the one to report.
            raise error from None
        if isinstance(exc, grpc.RpcError):
            self._retry_or_raise(call, exc)
        raise exc

    def _retry_or_raise(self, call: CallState, exc: grpc.RpcError) -> NoReturn:
        """Raise Retry when ``call`` may be made again, after a backoff that ends
        before its deadline; else the error ``exc`` maps to."""
        wait = None if call.responded else pushback(exc)
        if wait is not None:
            # The server did not run the call and said when to ask again (it is
            # starting): wait for it within the deadline, whatever the retries left
            # and whether the call may be sent twice. A little jitter keeps callers
            # that waited together from all coming back in the same instant.
            call.unavailable = call.starting = _details(exc)
            call.pushed_back += 1
            delay = wait * (0.8 + 0.4 * random.random())
            if call.deadline is None or time.monotonic() + delay < call.deadline:
                raise Retry(delay)
            raise self._error(exc, call) from exc
        if _code(exc) in RETRY_CODES:
            call.starting = None  # gone or refusing: no longer a server about to serve
        if (
            _code(exc) in RETRY_CODES
            and call.idempotent
            and not call.responded  # the server answered in part: it was reached
            and call.attempts - call.pushed_back <= self.retries
        ):
            call.unavailable = _details(exc)
            delay = backoff(call.attempts)
            if call.deadline is None or time.monotonic() + delay < call.deadline:
                raise Retry(delay)
        raise self._error(exc, call) from exc

    def _error(self, exc: grpc.RpcError, call: CallState) -> TensorwireError:
        code = _code(exc)
        details = _details(exc)
        cls = error_class(code.name)
        if code is grpc.StatusCode.UNAVAILABLE and call.starting is not None:
            # Reached, but not serving yet: the deadline ran out while waiting.
            waited = f" (still, after {call.attempts} attempts)" if call.attempts > 1 else ""
            details = f"{self.target}: {details}{waited}"
        elif code is grpc.StatusCode.UNAVAILABLE:
            details = self._unreachable(details, call.attempts)
        elif cls is UnavailableError:
            details = f"{self.target}: {details}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and call.starting is not None:
            details = (
                f"{details} on attempt {call.attempts}, waiting for {self.target}: {call.starting}"
            )
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and call.unavailable is not None:
            # The time ran out on a retry: say why there were retries at all.
            before = self._unreachable(call.unavailable, 1)
            details = f"{details} on attempt {call.attempts}; before it: {before}"
        return cls(details, request_id(exc))

    def _unreachable(self, details: str, attempts: int) -> str:
        tried = f" (after {attempts} attempts)" if attempts > 1 else ""
        return f"cannot reach tensorwire server at {self.target}: {details}{tried}"
