"""TensorService as the fuzz suite sees it: its methods, the models and functions the
test server has, the statuses a malformed request may get, and the oracles that say
whether a request is malformed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, settings

from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import streaming
from tensorwire_server.engine.functions import FUNCTIONS

SERVICE = pb.DESCRIPTOR.services_by_name["TensorService"]
#: Seconds any one request may take: a malformed request is refused at once, but one
#: that asked for the data port and never connects waits for its ticket (the server's
#: TICKET_SECONDS, 10 s) and is then told so; past that, the server's answer would race
#: the caller's own deadline.
CALL_TIMEOUT = 15.0
#: What the server answers a stream whose ticket no data connection presented.
UNCLAIMED_TICKET = "no data connection presented the ticket"
#: How much the server's RSS may grow over the storm: allocator slack, far below what
#: keeping the storm's payloads (its large uploads alone are 128 MiB) would cost.
RSS_SLACK = 64 << 20
#: Statuses a malformed request may get: each names the client's mistake.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
#: The models the server runs: the built-ins and three toys.
TOYS = ("quadratic", "two_heads", "raises")
MODELS = frozenset({"identity", "echo", "mlp", "mlp64", *TOYS})
#: Input names of the models with a fixed signature.
MODEL_INPUTS = {
    "identity": {"input"},
    "mlp": {"input"},
    "mlp64": {"input"},
    "quadratic": {"x"},
    "two_heads": {"x", "y"},
    "raises": {"x"},
}
FUNCTION_NAMES = sorted(FUNCTIONS)
# Fewer hypothesis examples, each a batch of requests sent concurrently: the count is
# cheap, generation stays varied, and CI is deterministic (no database, no shrinking).
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@dataclass(frozen=True)
class Method:
    """One TensorService RPC; for a *Stream RPC, ``request`` and ``response`` are the
    header messages of its parts."""

    name: str
    path: str
    streamed: bool
    request: type[Message]
    response: type[Message]


def _method(descriptor: Any) -> Method:
    def message(name: str) -> type[Message]:
        cls: type[Message] = getattr(pb, name.removesuffix("Part"))
        return cls

    return Method(
        descriptor.name,
        f"/{SERVICE.full_name}/{descriptor.name}",
        descriptor.client_streaming,
        message(descriptor.input_type.name),
        message(descriptor.output_type.name),
    )


METHODS = {m.name: _method(m) for m in SERVICE.methods}
UNARY = [name for name, m in METHODS.items() if not m.streamed]
STREAMS = [name for name, m in METHODS.items() if m.streamed]
TWIN = {name.removesuffix("Stream"): name for name in STREAMS}
assert set(TWIN) <= set(UNARY) and STREAMS, "the service has changed: update this suite"


# ------------------------------------------------------------------ oracles


def names_nothing(message: Message) -> bool:
    """Whether a parsed request names no model or function the server has."""
    if isinstance(message, pb.InferRequest):
        return message.model not in MODELS
    if isinstance(message, pb.CallRequest):
        return message.function not in FUNCTIONS
    if isinstance(message, pb.GradRequest):
        if message.WhichOneof("target") == "function":
            return message.function not in FUNCTIONS
        return message.model not in MODELS
    return False  # InfoRequest takes nothing, so any InfoRequest will do


def unary_malformed(method: Method, raw: bytes) -> bool:
    """Whether the server must refuse ``raw``: it does not parse, or names nothing."""
    try:
        message = method.request.FromString(raw)
    except DecodeError:
        return True
    return names_nothing(message)


def stream_malformed(method: Method, parts: Sequence[bytes]) -> bool:
    """Whether the server must refuse a stream: it is not a header and the chunks it
    declares (the client's own receiver says), or its request names nothing."""
    receiver = streaming.StreamReceiver(method.request)
    try:
        for raw in parts:
            receiver.feed(raw)
        received = receiver.finish()
    except Exception:
        return True
    finally:
        receiver.close()
    return names_nothing(received.message)
