"""What every RPC of every service passes before it runs: the server's state, the
caller's token and scope, and the deadline it waited in the queue against.

One interceptor, so that no RPC (tensorwire's own, health, reflection, those added
later) can be reached around it; tests walk the service descriptors to prove it.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from tensorwire.wire.protocol import (
    REQUEST_ID_KEY,
    RETRY_PUSHBACK_KEY,
    SESSION_KEY,
    STARTING_PUSHBACK_MS,
)
from tensorwire_server import observe, rpc
from tensorwire_server.heap import HeapTrimmer
from tensorwire_server.observe import Call, Metrics
from tensorwire_server.security import AUTHENTICATED, PUBLIC, Tokens, scope_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reject:
    """The gate's answer to an RPC it does not let run: a status and its message, and
    for a server that will serve soon, when to ask again (gRPC's server pushback)."""

    code: grpc.StatusCode
    message: str
    pushback_ms: int | None = None


Context = rpc.Context

if TYPE_CHECKING:  # grpc-stubs makes the classes generic; grpc's own are not subscriptable
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


class Lifecycle:
    """Where the server is in its life: starting, serving, draining or stopped.
    ``on_change`` hears each new state (the health service follows it)."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the device failed for good: an orchestrator must restart us

    def __init__(self, on_change: Callable[[str], None] | None = None) -> None:
        self.state = self.STARTING
        self._on_change = on_change
        if on_change is not None:
            on_change(self.state)

    def move(self, state: str) -> None:
        """Enter ``state``."""
        self.state = state
        log.info("server %s", state)
        if self._on_change is not None:
            self._on_change(state)


class InFlight:
    """How many requests are running, so that a drain can wait for them and not for
    long-lived streams such as health watches; ``heap`` hears of each too."""

    def __init__(self, heap: HeapTrimmer | None = None) -> None:
        self._count = 0
        self._idle = threading.Condition()
        self._heap = heap

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1
        if self._heap is not None:
            self._heap.busy()

    def __exit__(self, *_: object) -> None:
        with self._idle:
            self._count -= 1
            if not self._count:
                self._idle.notify_all()
        if self._heap is not None:
            self._heap.idle()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until none run, at most ``timeout`` seconds; whether none run."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._count, timeout)


class Gate(_Interceptor):
    """Admits an RPC or answers it with a clear status before any of it runs."""

    def __init__(
        self,
        tokens: Tokens,
        lifecycle: Lifecycle,
        default_deadline: float,
        metrics: Metrics,
        heap: HeapTrimmer | None = None,
    ) -> None:
        self.tokens = tokens
        self.lifecycle = lifecycle
        self.default_deadline = default_deadline
        self.metrics = metrics
        self.in_flight = InFlight(heap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        # This runs as the call arrives, on the event loop.
        arrived = time.monotonic()
        handler: Handler | None = await continuation(details)
        if handler is None:  # an unknown method (the stubs say it cannot be: it can)
            return handler  # type: ignore[return-value]  # gRPC answers UNIMPLEMENTED
        method: str = details.method
        scope = scope_of(method)
        call = Call(method, observe.request_id(details.invocation_metadata))
        call.session = _session(details.invocation_metadata)
        reject = self._state(scope) or self._caller(call, scope, details)
        counter = None if scope == PUBLIC else self.in_flight
        return _guarded(
            handler, reject, arrived + self.default_deadline, counter, call, self.metrics
        )

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
            return Reject(
                grpc.StatusCode.UNAVAILABLE, "the server's device failed; it must be restarted"
            )
        return Reject(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def _caller(self, call: Call, scope: str, details: grpc.HandlerCallDetails) -> Reject | None:
        method = call.method
        if not self.tokens or scope == PUBLIC:
            return None
        token = _bearer(details.invocation_metadata)
        if token is None:
            return Reject(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a bearer token: send metadata 'authorization: Bearer <token>'",
            )
        identity = self.tokens.identify(token)
        if identity is None:
            log.info("%s: refused an unknown token", method)
            return Reject(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        call.caller = identity.name
        if scope != AUTHENTICATED and scope not in identity.scopes:
            log.info("%s: token %r lacks scope %r", method, identity.name, scope)
            return Reject(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {identity.name!r} lacks the {scope!r} scope that {method} needs",
            )
        return None


def _session(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == SESSION_KEY and isinstance(value, str):
            return value
    return ""


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            kind, _, token = value.partition(" ")
            if kind.lower() == "bearer" and token:
                return token.strip()
    return None


def _guarded(
    handler: Handler,
    reject: Reject | None,
    default_deadline: float,
    counter: InFlight | None,
    call: Call,
    metrics: Metrics,
) -> Handler:
    """``handler`` with the gate's verdict checked first, before the behavior sees its
    request; counted while it runs, and recorded (metrics, access log) when it ends."""

    async def check(context: Context) -> None:
        if reject is not None:
            if reject.pushback_ms is not None:
                context.set_trailing_metadata(
                    (
                        (REQUEST_ID_KEY, call.request_id),
                        (RETRY_PUSHBACK_KEY, str(reject.pushback_ms)),
                    )
                )
            await context.abort(reject.code, reject.message)
        remaining = rpc.remaining(context)
        if remaining is not None and remaining <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed while the request waited for a worker; it did not run",
            )
        # When the call must have started its work (Compute checks it), and how long
        # it may wait in a model's queue: its own deadline, or the default one.
        call.deadline = default_deadline if remaining is None else time.monotonic() + remaining

    @asynccontextmanager
    async def recorded(context: Context) -> AsyncIterator[None]:
        call.started = time.perf_counter()
        token = observe.set_current(call)
        metrics.running.inc()
        code = "UNKNOWN"
        try:
            await check(context)
            if counter is None:
                yield
            else:
                with counter:
                    yield
            code = "OK"
        except BaseException:
            code = _code(context)
            raise
        finally:
            metrics.running.dec()
            metrics.finish(call, code)
            observe.reset_current(token)

    def wrap(behavior: Callable[..., Any], streams: bool) -> Any:
        async def run(request: Any, context: Context) -> Any:
            # Trailing metadata only: a unary response's initial metadata would cost a
            # separate send operation, ~10% of a small request's server CPU.
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
            async with recorded(context):
                return await behavior(request, context)

        async def run_streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            # Initial metadata too, so a streaming client has the id before the end.
            pair = ((REQUEST_ID_KEY, call.request_id),)
            await context.send_initial_metadata(pair)
            context.set_trailing_metadata(pair)
            async with recorded(context):
                async for response in behavior(request, context):
                    yield response

        async def run_writing(request: Any, context: Context) -> None:
            # A streaming handler that writes its responses itself (health's Watch).
            pair = ((REQUEST_ID_KEY, call.request_id),)
            await context.send_initial_metadata(pair)
            context.set_trailing_metadata(pair)
            async with recorded(context):
                await behavior(request, context)

        if not streams:
            return run
        return run_streaming if inspect.isasyncgenfunction(behavior) else run_writing

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attribute, make in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            wrapped: Handler = make(
                wrap(behavior, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            return wrapped
    return handler  # pragma: no cover - every handler has one of the four kinds


def _code(context: Context) -> str:
    """The status an aborted call ends with: what abort set, else a server error."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
