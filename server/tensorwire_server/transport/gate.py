"""The server's interceptor (a grpc.aio.ServerInterceptor): what every RPC of every
service passes before it runs. The ``Gate`` checks the server's state (``lifecycle``),
the caller's token and scope (``security``) and its budgets (``admission``), then
runs the call behind it (``guarded``: deadline, request reading, counting, recording).

One interceptor, so that no RPC (tensorwire's own, health, reflection, those added
later) can be reached around it; tests walk the service descriptors to prove it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from tensorwire.wire.protocol import REQUEST_ID_KEY, SESSION_KEY, STARTING_PUSHBACK_MS
from tensorwire_server import calls
from tensorwire_server.calls import Call
from tensorwire_server.settings import Settings
from tensorwire_server.telemetry.metrics import Metrics
from tensorwire_server.transport.admission import Admission, Quotas
from tensorwire_server.transport.guarded import PUBLIC_READERS, Context, Handler, Reject, guarded
from tensorwire_server.transport.heap import HeapTrimmer
from tensorwire_server.transport.lifecycle import InFlight, Lifecycle
from tensorwire_server.transport.security import AUTHENTICATED, PUBLIC, Identity, Tokens

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc-stubs makes the class generic; grpc's own is not subscriptable
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class Gate(_Interceptor):
    """Admits an RPC or answers it with a clear status before any of it runs."""

    def __init__(
        self,
        tokens: Tokens,
        lifecycle: Lifecycle,
        default_deadline: float,
        metrics: Metrics,
        heap: HeapTrimmer | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.tokens = tokens
        self.lifecycle = lifecycle
        self.default_deadline = default_deadline
        self.metrics = metrics
        self.in_flight = InFlight(heap)
        self.heap = heap
        quiet_sends_to_gone_clients()
        #: How many calls may run at once, by kind and by caller.
        self.admission = Admission(quotas or Quotas.from_settings(Settings()))
        #: Public messages (health's Check and Watch name a service) read at once: a
        #: message may be as large as max_message_bytes and anyone may send one, so at
        #: most this many are ever buffered, whatever the public budgets allow.
        self.public_reads = asyncio.Semaphore(PUBLIC_READERS)
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(details)
        if handler is None:  # an unknown method (the stubs say it cannot be: it can)
            return handler  # type: ignore[return-value]  # gRPC answers UNIMPLEMENTED
        method: str = details.method
        # Wrapped once per method: a call pays for its checks, not for building them.
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._guarded[method] = (handler, guarded(self, method, handler))
        return cached[1]

    def admit(self, method: str, scope: str, context: Context) -> tuple[Call, Reject | None]:
        """The record of a call as it arrives, with the verdict on it (None: it runs):
        the server's state, then the caller's token and scope. One pass over its
        metadata for the request id, the session and the token. A fast-lane call
        (lane.LaneContext) is its connection's grant's identity, authenticated when
        the grant was issued: no token travels on the lane."""
        granted: Identity | None = getattr(context, "granted", None)
        return self.admit_headers(method, scope, context.invocation_metadata() or (), granted)

    def admit_headers(
        self,
        method: str,
        scope: str,
        headers: Iterable[tuple[str, Any]],
        granted: Identity | None = None,
    ) -> tuple[Call, Reject | None]:
        """``admit`` from a call's headers as (lower-case name, value) pairs, whatever
        the protocol that carried them: gRPC's metadata or HTTP's headers (the rest
        package), so that both pass the same checks; ``granted``: the identity a
        fast-lane grant established."""
        request_id = session = traceparent = tracestate = ""
        token: str | None = None
        for key, value in headers:
            if not isinstance(value, str):
                continue
            if key == REQUEST_ID_KEY:
                request_id = value
            elif key == SESSION_KEY:
                session = value
            elif key == "authorization" and token is None:
                token = _bearer(value)
            elif key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
        call = Call(method, calls.request_id(request_id))
        call.session = session
        call.traceparent = traceparent
        call.tracestate = tracestate
        return call, self._state(scope) or self._caller(call, scope, token, granted)

    def _state(self, scope: str) -> Reject | None:
        state = self.lifecycle.state
        if scope == PUBLIC or state == Lifecycle.SERVING:
            return None
        if state == Lifecycle.STARTING:
            # It will serve soon: the pushback tells clients when to ask again.
            return Reject(
                grpc.StatusCode.UNAVAILABLE,
                "the server is starting: models are loading",
                pushback_ms=STARTING_PUSHBACK_MS,
            )
        if state == Lifecycle.FAILED:
            # Not UNAVAILABLE: no retry here can succeed (device.faults.DeviceHealth).
            return Reject(
                grpc.StatusCode.INTERNAL, "the server's device failed; it must be restarted"
            )
        return Reject(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def _caller(
        self, call: Call, scope: str, token: str | None, granted: Identity | None = None
    ) -> Reject | None:
        method = call.method
        if not self.tokens or scope == PUBLIC:
            return None
        if granted is not None:
            return self._scoped(call, scope, granted)
        if token is None:
            return Reject(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a bearer token: send metadata 'authorization: Bearer <token>'",
            )
        identity = self.tokens.identify(token)
        if identity is None:
            log.info("%s: refused an unknown token", method)
            return Reject(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        return self._scoped(call, scope, identity)

    def _scoped(self, call: Call, scope: str, identity: Identity) -> Reject | None:
        """The call is ``identity``'s: refused unless it holds ``scope``."""
        method = call.method
        call.caller = identity.name
        call.identity = identity
        if scope != AUTHENTICATED and scope not in identity.scopes:
            log.info("%s: token %r lacks scope %r", method, identity.name, scope)
            return Reject(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {identity.name!r} lacks the {scope!r} scope that {method} needs",
            )
        return None


def _bearer(value: str) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header value."""
    kind, _, token = value.partition(" ")
    if kind.lower() == "bearer" and token:
        return token.strip()
    return None


class _GoneClientSends(logging.Filter):
    """grpc.aio logs a response that could not be sent because its client had just
    cancelled as an ERROR with a traceback, when the failed send is noticed before the
    cancellation: the call is recorded CANCELLED; this is a debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if (
            type(error).__name__ == "ExecuteBatchError"
            and "SendMessageOperation" in str(error)
            and "(<" in str(error)  # one failed operation: a response, not a status
        ):
            method = record.getMessage().rpartition("[")[2].rstrip("]")
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            record.msg, record.args = "%s: a response not sent: its client had gone", (method,)
        return True


def quiet_sends_to_gone_clients() -> None:
    """Install ``_GoneClientSends`` on grpc.aio's logger, once."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _GoneClientSends) for f in logger.filters):
        logger.addFilter(_GoneClientSends())
