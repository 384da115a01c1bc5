"""The transport both twins share: the client's settings, its channels, replicas and
pinning, and each call's first decisions (its deadline, whether it streams, whether
it may be sent twice). Its two kinds, ``BlockingTransport`` and ``AsyncTransport``,
add only the waiting: grpc against grpc.aio, ``time.sleep`` against
``asyncio.sleep``, the data port's work in place against on a thread.
"""

from __future__ import annotations

import copy
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, NoReturn, Self, TypeVar

import grpc
from google.protobuf.message import Message

from tensorwire._flow import Route, Send
from tensorwire._transport.calls import CallState, Reporter
from tensorwire._transport.channel import (
    CLIENT_OPTIONS,
    Pem,
    client_security,
    read_pem,
    split_address,
    with_trace_context,
)
from tensorwire._transport.dataport import DataRoute, DataRoutes, data_host, tls_context
from tensorwire._transport.lane import Lane, LaneMethod, keepalive, lane_methods, wanted
from tensorwire._transport.methods import METHODS, RESPONSES, STREAMED, method_path
from tensorwire._transport.status import DEFAULT_RETRIES, status_code
from tensorwire._transport.targets import ROUND_ROBIN, Target, parse_target, pinned, replicas
from tensorwire._transport.ticket_exchange import TicketExchange
from tensorwire.errors import TensorwireError
from tensorwire.types import UseClientDefault
from tensorwire.wire.codec import Received, receiver
from tensorwire.wire.protocol import CHANNEL_OPTIONS
from tensorwire.wire.streaming import DEFAULT_CHUNK_SIZE

M = TypeVar("M", bound=Message)

#: Requests with at least this many payload bytes travel as a stream. Measured on
#: loopback (docs/performance.md): below it the unary path's lower setup cost wins.
DEFAULT_STREAM_THRESHOLD: Final = 2 << 20

#: The reporter of every call without a progress callback: it has nothing to report
#: and no callback whose error it could keep, so one serves them all.
_SILENT: Final = Reporter(None)


class Transport:
    """Target, timeout, retries, credentials, channels and attempts; ``_GRPC`` (grpc or
    grpc.aio) makes the channel. ``name`` is how errors name the client that holds it
    (its class: "Client is closed")."""

    _GRPC: ClassVar[Any]
    #: The fast lane's kind of connection pool and method (blocking or asyncio).
    _LANE: ClassVar[type[Lane]] = Lane
    _LANE_METHOD: ClassVar[Any] = LaneMethod

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        name: str,
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
        fast_lane: bool | None = None,
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
        self.name = name
        self.timeout = timeout
        self.retries = retries
        self.stream_threshold = stream_threshold
        self.chunk_size = chunk_size
        #: Whether its channel has TLS.
        self.secure = credentials is not None
        #: The metadata of every call: the token, if any (None: none).
        self.metadata = metadata or None
        self._closed = False
        self._credentials = credentials
        self._options = [*security_options, *options]
        # The data port's TLS is Python's own: made from the same certificates, and
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
        # The fast lane rides the data port: its TLS, its reach (lane.py).
        self._lane_on = self._data_on and wanted(fast_lane)
        self._connect(where)

    def _connect(self, where: Target) -> None:
        """Open the channel to ``where``; the one-replica channel opens when first
        needed (``pinned_methods``)."""
        self.target = where.name
        self._where = where
        self._channel = self._open_channel(where)
        self._lanes: list[Lane] = []
        self._methods = self._laned(self._bind_methods(self._channel), where)
        # The route of every call that names none (most): made once, not per call.
        self._route = Route(self._methods, self.metadata)
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

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed

    def pinned(self) -> Self:
        """A new transport with this one's settings whose calls all go to the replica
        this one sends its stateful calls to (``Client.pin``)."""
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
                    self._pinned = (where, self._laned(self._bind_methods(channel), where), channel)
            return self._pinned

    def pinned_methods(self) -> dict[str, Any]:
        """Like ``_methods``, bound to a channel that reaches one replica only, the same
        one for the client's whole life: calls that create or name state held by one
        server (handles, sessions) go through these, so they find it. A retried call
        goes to the same replica. With a target of one server: ``_methods`` itself."""
        self._check_open()
        return self._pin()[1]

    def _release(self) -> list[Any]:
        """Mark it closed and close every data connection; every channel it opened,
        which ``close`` closes (each kind its own way)."""
        self._closed = True
        for lane in self._lanes:
            lane.close()
        pinned_channel = None if self._pinned is None else self._pinned[2]
        channels = [self._channel] if pinned_channel is None else [self._channel, pinned_channel]
        return channels + self._data.close()

    def _data_route(self, call: CallState) -> DataRoute | None:
        """Where a streamed attempt goes when its payloads take the data port (None:
        they go through gRPC): see DataRoutes.route."""
        session = self._pinned
        of_session = session is not None and call.methods is session[1]
        return self._data.route(
            call.methods,
            balanced=call.methods is self._methods,
            session=session[0] if session is not None and of_session else None,
        )

    def _laned(self, methods: dict[str, Any], where: Target) -> dict[str, Any]:
        """``methods`` with their unary calls on the fast lane to ``where``'s one
        server, when the lane is on and ``where`` names one host (a Unix socket or
        several replicas: gRPC; a session's calls go to its replica's lane)."""
        host = data_host(where.channel) if self._lane_on else None
        if host is None:
            return methods
        named = self._server_name or where.authority  # the name TLS checks, as gRPC's
        lane = self._LANE(
            host,
            self._data_tls,
            None if named is None else split_address(named)[0],
            methods["OpenLane"],
            resolve=lambda: replicas(where),
        )
        lane.keepalive = keepalive([*CHANNEL_OPTIONS, *CLIENT_OPTIONS, *self._options])
        self._lanes.append(lane)
        return lane_methods(methods, lane, self._LANE_METHOD)

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
            raise RuntimeError(f"{self.name} for {self.target} is closed")

    # ------------------------------------------------------------ attempts

    def _begin(self, send: Send) -> CallState:
        """A new call as ``send`` describes it; its deadline covers every attempt and
        backoff."""
        self._check_open()
        timeout = send.timeout
        seconds = self.timeout if isinstance(timeout, UseClientDefault) else timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        spec = METHODS[send.method]
        route = send.route or self._route
        streamed = spec.streamed and (
            route.stream or send.encoder.payload_bytes >= self.stream_threshold
        )
        idempotent = spec.idempotent if route.idempotent is None else route.idempotent
        return CallState(
            send.method,
            send.encoder,
            _SILENT if send.progress is None else Reporter(send.progress),
            deadline,
            streamed,
            methods=route.methods,
            metadata=with_trace_context(route.metadata),
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
        if status_code(exc) is grpc.StatusCode.OUT_OF_RANGE and METHODS[call.method].streamed:
            call.streamed = True
            return
        call.retry_or_raise(exc, self.retries, self.target)

    def _exchange(self, call: CallState, chunks_follow: Callable[[bool], None]) -> TicketExchange:
        """The exchange of a streamed attempt: every attempt sends the request from its
        start and reports progress from 0; its payloads take the data port when there
        is a route for them (``chunks_follow``: see TicketExchange)."""
        return TicketExchange(call, self._data_route(call), self.chunk_size, chunks_follow)

    def _stream_failed(self, call: CallState, exc: BaseException) -> NoReturn:
        """Raise what a streamed attempt that failed with ``exc`` raises, or Retry."""
        error = call.reporter.error
        if error is not None and error is not exc:
            # The progress callback raised while gRPC was taking the upload, which
            # cancelled the call: the callback's error is the one to report.
            raise error from None
        if isinstance(exc, grpc.RpcError):
            call.retry_or_raise(exc, self.retries, self.target)
        raise exc
