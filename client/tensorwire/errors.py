"""The tensorwire exception tree and its one table to and from gRPC status codes.

The server raises these and the client raises the same classes, so a caller catches
``tensorwire.NotFoundError`` whichever side found the problem. This module does not
import grpc: codes are carried by name so that the server's engine stays grpc-free.
"""

from __future__ import annotations

from typing import ClassVar


class TensorwireError(Exception):
    """Base of every tensorwire error; ``code`` is the gRPC status code's name."""

    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


def error_class(code_name: str) -> type[TensorwireError]:
    """The exception class for a gRPC status code's name; InternalError if unmapped."""
    return _BY_CODE.get(code_name, InternalError)
