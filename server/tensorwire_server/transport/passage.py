"""A call of a protocol other than gRPC (the rest package's HTTP) through the same gate
as every RPC: admitted from its headers by ``Gate.admit_headers`` (the server's state,
the caller's token and scope, the request id), given a place in the same ``Admission``
budgets, its deadline set, counted in the same ``InFlight`` (a drain waits for it),
and recorded in the same metrics and access log when it ends, however it ends.

``guarded`` does the same for gRPC's handlers, where grpc.aio's context carries the
verdict; here the protocol turns a ``Reject`` into its own answer (an HTTP status).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from tensorwire_server import calls, timeline
from tensorwire_server.calls import Call
from tensorwire_server.transport.gate import Gate
from tensorwire_server.transport.guarded import Reject
from tensorwire_server.transport.security import PUBLIC, scope_of


class Passage:
    """One call behind the gate: its record, the gate's verdict (None: it runs), and
    the status code it ends with, which the protocol sets (``OK`` once answered)."""

    __slots__ = ("call", "code", "reject")

    def __init__(self, call: Call, reject: Reject | None) -> None:
        self.call = call
        self.reject = reject
        #: How the call ended, a gRPC status code's name (the metrics' label).
        self.code = "UNKNOWN"


@contextmanager
def passage(
    gate: Gate,
    label: str,
    method: str,
    headers: Iterable[tuple[str, Any]],
    timeout: float | None,
) -> Iterator[Passage]:
    """The call ``label`` (its name in metrics and the access log), which needs the
    scope of gRPC ``method`` (a full path: both protocols need the same scopes),
    admitted or refused from ``headers`` (lower-case names) before its body is read;
    ``timeout``: the seconds its caller waits, else the server's default deadline.
    It is the current call while the block runs, and recorded with the passage's
    ``code`` when the block ends."""
    arrived = time.monotonic()
    scope = scope_of(method)
    public = scope == PUBLIC
    call, reject = gate.admit_headers(method, scope, headers)
    call.method = label
    call.deadline = arrived + (gate.default_deadline if timeout is None else timeout)
    metrics = gate.metrics
    metrics.begin(call)
    token = calls.set_current(call)
    here = Passage(call, reject)
    keys: tuple[str, ...] = ()
    counted = False
    try:
        if reject is None:
            identity = call.caller if gate.tokens else None
            entered = gate.admission.enter(gate.admission.places(label, public, False, identity))
            if isinstance(entered, str):
                here.reject = Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, entered)
            else:
                keys = entered
        if here.reject is None and timeout is not None and timeout <= 0:
            here.reject = Reject(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the request's timeout had passed; it did not run",
            )
        if here.reject is None and not public:
            gate.in_flight.__enter__()
            counted = True
        if here.reject is not None:
            here.code = here.reject.code.name
        call.timeline.add(timeline.GATE, call.timeline.start, time.perf_counter_ns())
        yield here
    except asyncio.CancelledError:
        here.code = "CANCELLED"  # the client went away
        raise
    finally:
        if counted:
            gate.in_flight.__exit__()
        metrics.end(call)
        if keys:
            gate.admission.leave(keys)
        metrics.finish(call, here.code)
        calls.reset_current(token)
