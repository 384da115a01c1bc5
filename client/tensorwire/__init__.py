"""tensorwire: use a remote GPU from Python, with NumPy and no torch."""

from tensorwire._base import USE_CLIENT_DEFAULT
from tensorwire.aio import AsyncClient
from tensorwire.client import Client
from tensorwire.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorwireError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from tensorwire.types import (
    DeviceInfo,
    DynamicBatching,
    GradResult,
    ModelInfo,
    ModelVersion,
    Progress,
    ProgressCallback,
    ServerInfo,
    TensorSpec,
    VersionStatistics,
)

__version__ = "0.1.0"

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "DeviceInfo",
    "DynamicBatching",
    "FailedPreconditionError",
    "GradResult",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelVersion",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Progress",
    "ProgressCallback",
    "ResourceExhaustedError",
    "ServerInfo",
    "TensorSpec",
    "TensorwireError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VersionStatistics",
    "__version__",
]
