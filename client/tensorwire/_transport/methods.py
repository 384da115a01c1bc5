"""The TensorService methods a client calls: what each answers, whether it has a
``<name>Stream`` twin for large messages, and whether it may be sent twice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from google.protobuf.message import Message

from tensorwire.v1 import tensorwire_pb2 as pb

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
    # A fast-lane grant (lane.py): one asked twice lapses unused, holding nothing.
    "OpenLane": MethodSpec(pb.OpenLaneResponse, streamed=False, idempotent=True),
}

#: The response message of each TensorService method.
RESPONSES: Final[dict[str, type[Message]]] = {n: s.response for n, s in METHODS.items()}

#: The methods that carry tensors; each has a ``<name>Stream`` twin for large messages.
STREAMED: Final = tuple(name for name, spec in METHODS.items() if spec.streamed)


def method_path(name: str) -> str:
    """The gRPC path of a TensorService method."""
    return f"/{SERVICE.full_name}/{name}"
