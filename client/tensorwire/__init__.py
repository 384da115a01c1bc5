"""tensorwire: use a remote GPU from Python, with NumPy and no torch."""

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
from tensorwire.programs import Program, StepRef
from tensorwire.remote import AsyncRemoteTensor, AsyncTrainer, RemoteTensor, Trainer
from tensorwire.types import (
    USE_CLIENT_DEFAULT,
    DeviceInfo,
    DynamicBatching,
    GradResult,
    ModelInfo,
    ModelVersion,
    ProgramResult,
    Progress,
    ProgressCallback,
    RemoteGradResult,
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
