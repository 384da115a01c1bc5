"""The fast lane's frames as the client sends and reads them (the format:
tensorwire/wire/lane.py): a call's request frame, and its response read as a grpc
status (``LaneRpcError``), so that the transport handles it exactly as gRPC's."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc

from tensorwire.wire import lane
from tensorwire.wire.codec import Received
from tensorwire.wire.lane import RESPONSE, RESPONSE_MAGIC


class LaneRpcError(grpc.RpcError):
    """A lane call's status, read as a grpc error is (code, details, trailing
    metadata), so that the transport handles it exactly as gRPC's."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self._trailing = tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


#: Status codes by their number on the wire.
CODES: Final = {code.value[0]: code for code in grpc.StatusCode}
_IDS = itertools.count(1)


def late() -> LaneRpcError:
    """The status of a call whose deadline passed on the lane (gRPC's own words)."""
    return LaneRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def frame(
    method: str, request: bytes, timeout: float | None, metadata: Any
) -> tuple[int, list[bytes]]:
    """A call's id and request frame: the metadata without the token (the grant
    stands for it)."""
    call_id = next(_IDS)
    if not metadata:  # most calls: no token, no session, no trace
        return call_id, lane.request_frame(call_id, method, timeout, b"", request)
    pairs = [(k, v) for k, v in metadata if k != "authorization" and isinstance(v, str)]
    return call_id, lane.request_frame(call_id, method, timeout, lane.pairs(pairs), request)


def opened(head: bytes | bytearray, call_id: int) -> tuple[int, int, int, int]:
    """The fields of the response frame at the start of ``head`` that answers call
    ``call_id``: its status code, the lengths of its status message and trailing
    metadata, and the bytes it holds after its head (read once: ``answer`` takes
    them). LaneError if it is not a response, or answers another call: then another
    process or thread shares the connection (a fork's)."""
    magic, answered, code, d, m, b = RESPONSE.unpack_from(head)
    if magic != RESPONSE_MAGIC:
        raise lane.LaneError("not a response frame")
    if answered != call_id:
        raise lane.LaneError("an answer to another call: the connection is shared")
    return code, d, m, int(d + m + b)


def credentials(metadata: Any) -> Any:
    """A call's metadata as its grant's call takes it: the token only. The grant is
    no part of the call (its trace, its session), only its way there."""
    kept = [(k, v) for k, v in metadata or () if k == "authorization"]
    return kept or None


def answer(
    fields: tuple[int, int, int, int], rest: memoryview, deserialize: Callable[[bytes], Any]
) -> Any:
    """The result of a response frame (``fields``: what ``opened`` read of its head;
    ``rest``: the frame's bytes after its head, no more): the response, or its
    LaneRpcError raised."""
    code, d, m, _ = fields
    if code == 0:
        result = deserialize(rest[d + m :])  # type: ignore[arg-type]
        if isinstance(result, Received) and result.payloads is not None and not rest.readonly:
            # A large answer's payloads are views of this call's own writable buffer,
            # which nothing else holds: the caller's already (no copy into new arrays).
            result = dataclasses.replace(result, owned=True)
        return result
    details = bytes(rest[:d]).decode(errors="replace")
    trailing = lane.unpairs(rest[d : d + m])
    raise LaneRpcError(CODES.get(code, grpc.StatusCode.UNKNOWN), details, trailing)
