"""The tensorwire exception tree, its one table to and from gRPC status codes (and from
those to HTTP statuses, for the v2 protocol over REST), and the
helpers that quote client-supplied names in error messages.

The server raises these and the client raises the same classes, so a caller catches
``tensorwire.NotFoundError`` whichever side found the problem. This module does not
import grpc: codes are carried by name so that the server's engine stays grpc-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Final

# An error message travels as gRPC metadata, which clients cap (8 KiB by default): past
# that they get RESOURCE_EXHAUSTED instead of the error. So a client-supplied name is
# quoted up to SHOWN characters, and a list of names up to LISTED of them.
SHOWN: Final = 100
LISTED: Final = 10


class TensorwireError(Exception):
    """Base of every tensorwire error; ``code`` is the gRPC status code's name.

    ``request_id`` is the id the server gave the call (its ``x-request-id``), which its
    logs carry too; None for an error found before anything reached a server."""

    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        if self.request_id is None:
            return self.message
        return f"{self.message} (request id {self.request_id})"


class InvalidArgumentError(TensorwireError):
    """A request was malformed or did not fit the model or function (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class OutOfRangeError(InvalidArgumentError):
    """A unary response too large for one gRPC message; the client streams instead."""

    code = "OUT_OF_RANGE"


class NotFoundError(TensorwireError):
    """An unknown model, function or other named thing (NOT_FOUND)."""

    code = "NOT_FOUND"


class FailedPreconditionError(TensorwireError):
    """The inputs do not allow the operation, e.g. a gradient of an int (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(TensorwireError):
    """The server ran out of memory or another limit for this request (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(TensorwireError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(TensorwireError):
    """The server could not be reached or is shutting down (UNAVAILABLE)."""

    code = "UNAVAILABLE"


class CancelledError(TensorwireError):
    """The call was cancelled (CANCELLED)."""

    code = "CANCELLED"


class UnauthenticatedError(TensorwireError):
    """Missing or bad credentials (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(TensorwireError):
    """Credentials lack the scope the call needs (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"


class UnimplementedError(TensorwireError):
    """The server does not implement the call (UNIMPLEMENTED)."""

    code = "UNIMPLEMENTED"


class InternalError(TensorwireError):
    """A server bug or a broken stream (INTERNAL, UNKNOWN, DATA_LOSS, ...)."""

    code = "INTERNAL"


_BY_CODE: dict[str, type[TensorwireError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OutOfRangeError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        CancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        InternalError,
    )
}
# Codes with no class of their own.
_BY_CODE.update(
    ALREADY_EXISTS=FailedPreconditionError,
    ABORTED=UnavailableError,
)


#: The HTTP status of each gRPC status code's name, for the v2 protocol over HTTP/REST
#: (the server's rest package): the mapping gRPC's own HTTP gateways use (Google's
#: API design guide), so that a REST client sees the status a gRPC client's code means.
HTTP_STATUS: Final[Mapping[str, int]] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


def http_status(code_name: str) -> int:
    """The HTTP status of a gRPC status code's name (HTTP_STATUS); 500 if unmapped."""
    return HTTP_STATUS.get(code_name, 500)


def error_class(code_name: str) -> type[TensorwireError]:
    """The exception class for a gRPC status code's name; InternalError if unmapped."""
    return _BY_CODE.get(code_name, InternalError)


def shown(name: str) -> str:
    """A client-supplied ``name`` quoted for an error message, cut short if long."""
    if len(name) <= SHOWN:
        return repr(name)
    return f"{name[:SHOWN]!r}... ({len(name)} characters)"


def listed(names: Iterable[str]) -> str:
    """Names for an error message, comma-separated; at most LISTED, each cut short."""
    items = list(names)
    text = ", ".join(n if len(n) <= SHOWN else f"{n[:SHOWN]}..." for n in items[:LISTED])
    return text + (f", ... ({len(items)} in all)" if len(items) > LISTED else "")
