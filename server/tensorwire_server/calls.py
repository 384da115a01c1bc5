"""The record of each call being answered (``Call``): what it asks of whom, its payload
bytes, batch, session and deadline, and the request id that ties a client's error to
the server's log.

The Gate opens a ``Call`` for every RPC and makes it current; the servicers add what
only they know (the model or function, payload bytes) through ``current()``; the Gate
closes it with its status code, and ``Metrics.finish`` makes it metrics and an access
log line.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from tensorwire_server import timeline
from tensorwire_server.timeline import Timeline

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_PROCESS_ID: Final = secrets.token_hex(8)
_COUNT = itertools.count(secrets.randbits(32))


@dataclass
class Call:
    """One RPC as it is being answered."""

    method: str
    request_id: str
    caller: str = ""
    #: The identity the gate matched the caller's token to (None: no tokens, or not
    #: yet checked): a fast-lane grant is bound to it, not to its name, which another
    #: token's line may share (rotation).
    identity: Any = field(default=None, repr=False)
    target: str = ""  # model or function
    #: The version of the model that answered (0: no model ran).
    version: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: Requests in the forward pass that served this one (0: no model ran).
    batch: int = 0
    #: When (``time.monotonic()``) the caller stops waiting; None: never.
    deadline: float | None = None
    #: The session the call names in its metadata; empty: none.
    session: str = ""
    #: Where its time went (timeline.py), from its arrival (``timeline.start``): read
    #: by the metrics and the tracer.
    timeline: Timeline = field(default_factory=Timeline, repr=False)
    #: The caller's W3C trace context (``traceparent``, ``tracestate``), if it sent one.
    traceparent: str = ""
    tracestate: str = ""
    #: Records the call (metrics, access log) with its status code, once; set by the
    #: gate. An error is recorded before its status is sent (rpc.abort): a client
    #: that has its answer finds it counted.
    record: Callable[[str], None] | None = field(default=None, repr=False)


_CURRENT: ContextVar[Call | None] = ContextVar("call", default=None)


def current() -> Call | None:
    """The call being answered on this thread, if any."""
    return _CURRENT.get()


def set_current(call: Call | None) -> Any:
    """Make ``call`` (and its timeline) the current one; a token for ``reset_current``."""
    return _CURRENT.set(call), timeline.activate(call.timeline if call is not None else None)


def reset_current(token: Any) -> None:
    """Restore the call current before ``set_current``."""
    calls_token, timeline_token = token
    _CURRENT.reset(calls_token)
    timeline.deactivate(timeline_token)


def request_id(given: str) -> str:
    """The client's own ``x-request-id`` (``given``) if it is a sane token, else a new
    one: 32 hex digits, a random half for this process and a count, as unique as a
    uuid4 for a process's calls and a tenth of its cost."""
    if given and _SAFE_ID.fullmatch(given):
        return given
    return f"{_PROCESS_ID}{next(_COUNT):016x}"
