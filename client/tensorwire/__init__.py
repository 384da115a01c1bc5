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
from tensorwire.remote import (
    AsyncRemoteTensor,
    AsyncTrainer,
    Program,
    ProgramResult,
    RemoteGradResult,
    RemoteTensor,
    StepRef,
    Trainer,
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
    SessionInfo,
    SessionsSummary,
    TensorSpec,
    VersionStatistics,
)
from tensorwire.wire.codec import Handle, Ref

__version__ = "0.1.0"

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "AsyncRemoteTensor",
    "AsyncTrainer",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "DeviceInfo",
    "DynamicBatching",
    "FailedPreconditionError",
    "GradResult",
    "Handle",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelVersion",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Program",
    "ProgramResult",
    "Progress",
    "ProgressCallback",
    "Ref",
    "RemoteGradResult",
    "RemoteTensor",
    "ResourceExhaustedError",
    "ServerInfo",
    "SessionInfo",
    "SessionsSummary",
    "StepRef",
    "TensorSpec",
    "TensorwireError",
    "Trainer",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VersionStatistics",
    "__version__",
]
