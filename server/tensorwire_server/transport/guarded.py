"""Each call behind the gate, from its arrival to its end: admitted (or refused) from
its headers alone, its deadline set, its request read (a public one's message small and
read one at a time), its behavior run, counted while it runs, and recorded when it
ends, however it ends.

``guarded`` wraps a method's handler once; ``gate.Gate`` (the server's interceptor)
wraps every method so and gives its verdict on each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc

from tensorwire.wire.protocol import REQUEST_ID_KEY, RETRY_PUSHBACK_KEY
from tensorwire_server import calls, timeline
from tensorwire_server.calls import Call
from tensorwire_server.telemetry.metrics import Metrics
from tensorwire_server.transport import rpc
from tensorwire_server.transport.admission import Admission
from tensorwire_server.transport.heap import HeapTrimmer
from tensorwire_server.transport.lifecycle import InFlight
from tensorwire_server.transport.security import PUBLIC, Tokens, scope_of

log = logging.getLogger(__name__)

Context = rpc.Context

if TYPE_CHECKING:  # grpc-stubs makes the class generic; grpc's own is not subscriptable
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


@dataclass(frozen=True)
class Reject:
    """The gate's answer to an RPC it does not let run: a status and its message, and
    for a server that will serve soon, when to ask again (gRPC's server pushback)."""

    code: grpc.StatusCode
    message: str
    pushback_ms: int | None = None


#: A request this large is parsed on a thread: tensorwire's and KServe's walks of a
#: large message are Python (about 1.3 ms per 10 KiB of tiny fields), and a request of
#: many small fields would hold the event loop meanwhile (35 ms at most, here).
OFF_LOOP_BYTES = 256 << 10
#: Seconds a public call may wait for its turn to be read and its message take to arrive.
_PUBLIC_READ_SECONDS = 10.0
#: Public messages read at once (Gate.public_reads).
PUBLIC_READERS: Final = 1
#: The largest public message served: health's requests name a service, nothing more.
PUBLIC_MESSAGE_BYTES: Final = 4096


class Gatekeeper(Protocol):
    """What a guarded call needs of the gate it passes: its verdict on the call, and
    the budgets, counter and settings it applies."""

    tokens: Tokens
    default_deadline: float
    metrics: Metrics
    admission: Admission
    in_flight: InFlight
    heap: HeapTrimmer | None
    public_reads: asyncio.Semaphore

    def admit(self, method: str, scope: str, context: Context) -> tuple[Call, Reject | None]:
        """The record of a call as it arrives, with the verdict on it (None: it runs)."""
        ...


class _Run:
    """One admitted (or refused) call from its arrival to its end, however it ends:
    gRPC's done callback gives back what it held and records its status, also for a
    stream whose client went away while its generator waited to be collected."""

    __slots__ = ("call", "counted", "ended", "gone", "keys", "ok", "responses", "token")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.token: Any = None
        self.ok = False  # the behavior finished without an error
        #: Cancelled, or waiting at a yield while gRPC sent its response: a call that
        #: ends so, with no status of its own, ended because its client went away.
        self.gone = False
        self.counted = False  # in the gate's InFlight
        self.ended = False  # no longer counted as running, and recorded
        self.keys: tuple[str, ...] = ()  # the admission budgets it holds a place in
        self.responses: Any = None  # a response generator to close if the call ends early

    def leave(self) -> None:
        """Restore the task's current call. A response generator that gRPC left
        suspended is finalized in a task of its own, whose context never had it."""
        with contextlib.suppress(ValueError):
            calls.reset_current(self.token)


def guarded(gate: Gatekeeper, method: str, handler: Handler) -> Handler:
    """``handler`` behind ``gate``: each call admitted (or answered with the gate's
    status) as it arrives, from its headers alone, before a byte of its request is read;
    its deadline set, counted while it runs (unless it is public: health), and recorded
    (metrics, access log) when it ends.

    Every method is served as a request stream, so that the gate decides when gRPC
    reads: a unary method's one message is read only once the call is admitted (the
    wire does not tell the two apart). A refused call never asks for its message, and
    HTTP/2 flow control stops its sender."""
    scope = scope_of(method)
    public = scope == PUBLIC
    counter = None if public else gate.in_flight
    metrics = gate.metrics
    admission = gate.admission
    default_deadline = gate.default_deadline
    streams = handler.response_streaming
    unary_request = not handler.request_streaming
    stream = handler.request_streaming or streams
    # Each caller's budgets, worked out once: identities are the tokens' names.
    known: dict[str | None, Any] = {}

    def places(identity: str | None) -> Any:
        found = known.get(identity)
        if found is None:
            found = known[identity] = admission.places(method, public, stream, identity)
        return found

    deserialize = handler.request_deserializer
    # A public method whose request has no fields (ServerLive, ServerReady, health's
    # List) is answered without reading it: nobody needs a token to send one, and
    # its message could be as large as any.
    reads = not unary_request or not public or deserialize is None or _fields(deserialize)

    def end(run: _Run, context: Context) -> None:
        """The behavior is done: the call stops counting as running (a drain waits for
        no response being sent) and is recorded. Once, from whichever comes first: the
        handler's end, or gRPC's done callback when a stream's client went away."""
        if run.ended:
            return
        run.ended = True
        if run.counted:
            counter.__exit__()  # type: ignore[union-attr]
        call = run.call
        metrics.end(call)
        if call.record is not None:  # not recorded yet (rpc.abort records errors)
            call.record("OK" if run.ok else _code(context, run.gone))

    def done(run: _Run, context: Context) -> None:
        """The call ended (answered, aborted, cancelled): give back what it holds. Its
        budgets are held until its response is sent."""
        end(run, context)
        if run.keys:
            admission.leave(run.keys)
        responses = run.responses
        if responses is not None and not run.ok:
            # Its client went while it waited at a yield: close it now, not at the next
            # collection, so that its request's buffers go with the call.
            with contextlib.suppress(RuntimeError):  # no loop: the server is stopping
                asyncio.get_running_loop().create_task(_close(responses))

    async def start(context: Context) -> _Run:
        """Admit the call, and start its record; abort it if it may not run."""
        arrived = time.monotonic()
        call, reject = gate.admit(method, scope, context)
        pair = ((REQUEST_ID_KEY, call.request_id),)
        if streams:  # a streaming client has the id before the end
            await context.send_initial_metadata(pair)
        # Trailing metadata only otherwise: a unary response's initial metadata would
        # cost a separate send operation, ~10% of a small request's server CPU.
        context.set_trailing_metadata(pair)
        call.deadline = arrived + default_deadline  # until check() knows better

        def record(code: str) -> None:
            call.record = None  # once
            metrics.finish(call, code)

        call.record = record
        metrics.begin(call)
        run = _Run(call)
        # grpc-stubs types the callback as a DoneCallback object; grpc calls any callable.
        context.add_done_callback(functools.partial(done, run))  # type: ignore[arg-type]
        run.token = calls.set_current(call)
        if reject is None:
            # A call's budgets: its token's share and the server's. Without tokens
            # there is nobody to tell apart, and the server's caps alone apply.
            identity = call.caller if gate.tokens else None
            entered = admission.enter(places(identity))
            if isinstance(entered, str):
                reject = Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, entered)
            else:
                run.keys = entered
        if reject is not None or not counted_in(run, context):
            await check(run, reject, context)
        call.timeline.add(timeline.GATE, call.timeline.start, time.perf_counter_ns())
        return run

    def counted_in(run: _Run, context: Context) -> bool:
        """``check`` of an admitted call whose deadline has not passed, without a
        coroutine (every call passes here): its deadline set and counted in; False,
        having done nothing, when its deadline passed."""
        remaining = rpc.remaining(context)
        if remaining is not None:
            if remaining <= 0:
                return False
            run.call.deadline = time.monotonic() + remaining
        if counter is not None:
            counter.__enter__()
            run.counted = True
        return True

    async def check(run: _Run, reject: Reject | None, context: Context) -> None:
        """Abort the call if the gate said so or its deadline passed; else set the
        deadline it works against and count it in."""
        call = run.call
        if reject is not None:
            if reject.pushback_ms is not None:
                context.set_trailing_metadata(
                    (
                        (REQUEST_ID_KEY, call.request_id),
                        (RETRY_PUSHBACK_KEY, str(reject.pushback_ms)),
                    )
                )
            await rpc.abort(context, reject.code, reject.message)
        remaining = rpc.remaining(context)
        if remaining is not None:
            if remaining <= 0:
                await rpc.abort(
                    context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the deadline passed while the request waited for a worker; it did not run",
                )
            # When the call must have started its work (Compute checks it), and how
            # long it may wait in a model's queue: its own deadline, or the default.
            call.deadline = time.monotonic() + remaining
        if counter is not None:
            counter.__enter__()
            run.counted = True

    async def request_of(requests: AsyncIterator[Any], context: Context) -> Any:
        """The request the behavior takes: a unary method's one message, read now
        (a large one parsed off the loop); a streaming method's stream as it is."""
        if not unary_request:
            return requests
        if not reads:
            return deserialize(b"")  # type: ignore[misc]
        try:
            # A public call holds a place in a small budget anyone may take: its few
            # bytes must come soon. Others wait on their own budgets.
            if public:
                async with asyncio.timeout(_PUBLIC_READ_SECONDS), gate.public_reads:
                    raw = await _read_public(requests, gate.heap)
            else:  # _read_one, written out
                raw = await anext(aiter(requests), None)
                if raw is not None:
                    await anext(aiter(requests), None)  # the end, which came with it
        except TimeoutError:
            late = f"{method}: no request message within {_PUBLIC_READ_SECONDS:g} s"
            await rpc.abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, late)
        if raw is None:
            if context.cancelled():  # the client went before it sent the message
                raise asyncio.CancelledError
            await rpc.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: no request message"
            )
            raise AssertionError("unreachable")  # abort raises
        if isinstance(raw, _Oversize):
            await rpc.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{method}: a {raw.size}-byte request; a public method's is at most "
                f"{PUBLIC_MESSAGE_BYTES} bytes",
            )
        if deserialize is None:
            return raw
        try:
            if len(raw) >= OFF_LOOP_BYTES:
                return await asyncio.to_thread(deserialize, raw)
            return deserialize(raw)
        except Exception as exc:  # another service's parser (tensorwire's return errors)
            log.debug("%s: malformed request: %s", method, exc)
        await rpc.abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: malformed request message"
        )

    behavior: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )

    async def unary(requests: AsyncIterator[Any], context: Context) -> Any:
        run = await start(context)
        with _Running(run, context, end):
            result = await behavior(await request_of(requests, context), context)
            run.ok = True
            return result

    async def streaming(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        run = await start(context)
        with _Running(run, context, end):
            run.responses = behavior(await request_of(requests, context), context)
            async with contextlib.aclosing(run.responses) as responses:
                async for response in responses:
                    run.gone = True  # until gRPC asks for the next one
                    yield response
                    run.gone = False
            run.ok = True

    async def writing(requests: AsyncIterator[Any], context: Context) -> None:
        # A streaming handler that writes its responses itself (health's Watch).
        run = await start(context)
        with _Running(run, context, end):
            await behavior(await request_of(requests, context), context)
            run.ok = True

    if not streams:
        guarded: Handler = grpc.stream_unary_rpc_method_handler(
            unary, response_serializer=handler.response_serializer
        )
        return guarded
    wrapped = streaming if inspect.isasyncgenfunction(behavior) else writing
    guarded = grpc.stream_stream_rpc_method_handler(
        wrapped,
        # A streaming method's messages are its behavior's to read; a unary one's, ours.
        request_deserializer=None if unary_request else deserialize,
        response_serializer=handler.response_serializer,
    )
    return guarded


class _Running:
    """The behavior runs: however it ends, the call is ended and recorded (``end``); a
    call that failed lets go of its request at once; a cancelled one is gone. A class,
    not a generator-based context manager: it wraps every small call, and a
    generator's costs a few µs of the loop's CPU."""

    __slots__ = ("context", "end", "run")

    def __init__(self, run: _Run, context: Context, end: Callable[[_Run, Context], None]) -> None:
        self.run, self.context, self.end = run, context, end

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        try:
            if kind is not None and issubclass(kind, asyncio.CancelledError):
                self.run.gone = True
            elif exc is not None and isinstance(exc, Exception):
                _let_go(exc)
        finally:
            self.end(self.run, self.context)
            self.run.leave()


def _fields(deserialize: Callable[[bytes], Any]) -> bool:
    """Whether the messages ``deserialize`` parses have any field."""
    message = deserialize(b"")
    return bool(getattr(getattr(message, "DESCRIPTOR", None), "fields", True))


async def _close(responses: Any) -> None:
    """Close a response generator the call left; one still running is ending anyway."""
    with contextlib.suppress(RuntimeError):
        await responses.aclose()


def _let_go(exc: BaseException) -> None:
    """Clear the locals of the frames a failed call's exception passed through: a
    frame that caught one error and raised another (an abort) is in a cycle with it,
    and would keep the call's request (its tensors, a message of any size) until the
    next collection. The tracebacks themselves stay, for whoever logs them."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # skips frames still running
        pending += (error.__context__, error.__cause__)


async def _read_one(requests: AsyncIterator[Any]) -> Any:
    """A unary call's one message (None: none came), and the end of its stream: gRPC's
    receiver holds the last message it gave until it is asked for the next, and would
    keep it alive as long as the call's objects live, after the call is over."""
    raw = await anext(aiter(requests), None)
    if raw is not None:
        await anext(aiter(requests), None)  # the end, which came with the message
    return raw


@dataclass(frozen=True)
class _Oversize:
    """A public message over PUBLIC_MESSAGE_BYTES, already let go of: its size."""

    size: int


async def _read_public(requests: AsyncIterator[Any], heap: HeapTrimmer | None) -> Any:
    """A public call's message, or _Oversize. Anyone may send one as large as gRPC
    takes, and reading it costs about three times its size (gRPC's buffers and
    Python's): an oversize one is dropped and the heap trimmed before the next public
    message is read (the caller holds Gate.public_reads), so that reads one after
    another do not pile up in the allocator."""
    if heap is not None:
        heap.busy()
    try:
        raw = await _read_one(requests)
        if raw is None or len(raw) <= PUBLIC_MESSAGE_BYTES:
            return raw
        size = len(raw)
        del raw
        if heap is not None:
            await asyncio.to_thread(heap.trim)
        return _Oversize(size)
    finally:
        if heap is not None:
            heap.idle()


def _code(context: Context, gone: bool) -> str:
    """The status a call that did not finish ends with: what abort set; CANCELLED when
    its client cancelled it or went away (``gone``: as far as the call could tell;
    gRPC's own flag comes later when a send is what failed); else a server error."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "CANCELLED" if gone or context.cancelled() else "UNKNOWN"
