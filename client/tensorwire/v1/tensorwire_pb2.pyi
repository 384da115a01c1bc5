from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_COMPLEX64: _ClassVar[DType]
    DTYPE_COMPLEX128: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_UINT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_COMPLEX64: DType
DTYPE_COMPLEX128: DType
DTYPE_UINT16: DType
DTYPE_UINT32: DType
DTYPE_UINT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "handle")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    handle: str
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., handle: _Optional[str] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "bool_value", "int_value", "float_value", "string_value", "list_value", "none_value", "ref")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    NONE_VALUE_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    list_value: ValueList
    none_value: bool
    ref: str
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., bool_value: bool = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ..., list_value: _Optional[_Union[ValueList, _Mapping]] = ..., none_value: bool = ..., ref: _Optional[str] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "any_shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ANY_SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    any_shape: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., any_shape: bool = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "description", "inputs", "outputs", "variadic", "parameter_count", "state", "reason", "versions", "max_batch_size", "dynamic_batching", "instances", "precision", "max_queue_size", "execution", "compiled_graphs", "recompilations")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VARIADIC_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_BATCHING_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    COMPILED_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    RECOMPILATIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    variadic: bool
    parameter_count: int
    state: str
    reason: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    max_batch_size: int
    dynamic_batching: DynamicBatching
    instances: _containers.RepeatedScalarFieldContainer[str]
    precision: str
    max_queue_size: int
    execution: str
    compiled_graphs: int
    recompilations: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., variadic: bool = ..., parameter_count: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., dynamic_batching: _Optional[_Union[DynamicBatching, _Mapping]] = ..., instances: _Optional[_Iterable[str]] = ..., precision: _Optional[str] = ..., max_queue_size: _Optional[int] = ..., execution: _Optional[str] = ..., compiled_graphs: _Optional[int] = ..., recompilations: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "state", "reason", "statistics")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: str
    reason: str
    statistics: VersionStatistics
    def __init__(self, version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., statistics: _Optional[_Union[VersionStatistics, _Mapping]] = ...) -> None: ...

class DynamicBatching(_message.Message):
    __slots__ = ("max_queue_delay_seconds", "preferred_batch_sizes")
    MAX_QUEUE_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    max_queue_delay_seconds: float
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_queue_delay_seconds: _Optional[float] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class VersionStatistics(_message.Message):
    __slots__ = ("model", "version", "request_count", "failure_count", "inference_count", "execution_count", "queue_seconds", "compute_seconds", "batch_sizes", "rejected_count", "expired_count")
    class BatchSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_COUNT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    request_count: int
    failure_count: int
    inference_count: int
    execution_count: int
    queue_seconds: float
    compute_seconds: float
    batch_sizes: _containers.ScalarMap[int, int]
    rejected_count: int
    expired_count: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., request_count: _Optional[int] = ..., failure_count: _Optional[int] = ..., inference_count: _Optional[int] = ..., execution_count: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., batch_sizes: _Optional[_Mapping[int, int]] = ..., rejected_count: _Optional[int] = ..., expired_count: _Optional[int] = ...) -> None: ...

class FunctionInfo(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("name", "description", "total_memory_bytes", "free_memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    total_memory_bytes: int
    free_memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., free_memory_bytes: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("server_version", "torch_version", "device", "models", "functions", "sessions")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    torch_version: str
    device: DeviceInfo
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionInfo]
    sessions: SessionsSummary
    def __init__(self, server_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., functions: _Optional[_Iterable[_Union[FunctionInfo, _Mapping]]] = ..., sessions: _Optional[_Union[SessionsSummary, _Mapping]] = ...) -> None: ...

class SessionsSummary(_message.Message):
    __slots__ = ("count", "bytes", "quota_bytes", "ttl_seconds", "max_sessions", "losses", "optimizers")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    count: int
    bytes: int
    quota_bytes: int
    ttl_seconds: float
    max_sessions: int
    losses: _containers.RepeatedScalarFieldContainer[str]
    optimizers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., max_sessions: _Optional[int] = ..., losses: _Optional[_Iterable[str]] = ..., optimizers: _Optional[_Iterable[str]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "inputs", "outputs", "version", "keep")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    version: int
    keep: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ..., keep: bool = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("model", "outputs", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    version: int
    def __init__(self, model: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class GradRequest(_message.Message):
    __slots__ = ("model", "function", "inputs", "args", "kwargs", "wrt", "grad_outputs", "param_grads", "model_version", "keep")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAM_GRADS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    model: str
    function: str
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: _containers.MessageMap[str, Value]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    grad_outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    param_grads: bool
    model_version: int
    keep: bool
    def __init__(self, model: _Optional[str] = ..., function: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, Value]] = ..., wrt: _Optional[_Iterable[str]] = ..., grad_outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., param_grads: bool = ..., model_version: _Optional[int] = ..., keep: bool = ...) -> None: ...

class GradResponse(_message.Message):
    __slots__ = ("outputs", "grads", "param_grads")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    PARAM_GRADS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    param_grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., param_grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("function", "args", "kwargs", "keep")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    function: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: _containers.MessageMap[str, Value]
    keep: bool
    def __init__(self, function: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, Value]] = ..., keep: bool = ...) -> None: ...

class CallResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ModelStatisticsRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelStatisticsResponse(_message.Message):
    __slots__ = ("statistics",)
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    statistics: _containers.RepeatedCompositeFieldContainer[VersionStatistics]
    def __init__(self, statistics: _Optional[_Iterable[_Union[VersionStatistics, _Mapping]]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DataTransfer(_message.Message):
    __slots__ = ("ticket", "port", "payload_bytes", "expires_in_seconds", "local_socket", "local_proof")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PROOF_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    port: int
    payload_bytes: int
    expires_in_seconds: float
    local_socket: str
    local_proof: bytes
    def __init__(self, ticket: _Optional[bytes] = ..., port: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., expires_in_seconds: _Optional[float] = ..., local_socket: _Optional[str] = ..., local_proof: _Optional[bytes] = ...) -> None: ...

class InferRequestPart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: InferRequest
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[InferRequest, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class InferResponsePart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: InferResponse
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[InferResponse, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class GradRequestPart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GradRequest
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[GradRequest, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class GradResponsePart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GradResponse
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[GradResponse, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class CallRequestPart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CallRequest
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[CallRequest, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class CallResponsePart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CallResponse
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[CallResponse, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session", "quota_bytes", "ttl_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    quota_bytes: int
    ttl_seconds: float
    def __init__(self, session: _Optional[str] = ..., quota_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class DescribeSessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeSessionResponse(_message.Message):
    __slots__ = ("session", "handles", "trainers", "bytes", "quota_bytes", "ttl_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    TRAINERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    handles: _containers.RepeatedCompositeFieldContainer[Tensor]
    trainers: _containers.RepeatedScalarFieldContainer[str]
    bytes: int
    quota_bytes: int
    ttl_seconds: float
    def __init__(self, session: _Optional[str] = ..., handles: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., trainers: _Optional[_Iterable[str]] = ..., bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, handles: _Optional[_Iterable[str]] = ...) -> None: ...

class FreeResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class ProgramStep(_message.Message):
    __slots__ = ("name", "function", "model", "args", "kwargs", "version")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    function: str
    model: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: _containers.MessageMap[str, Value]
    version: int
    def __init__(self, name: _Optional[str] = ..., function: _Optional[str] = ..., model: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, Value]] = ..., version: _Optional[int] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("inputs", "steps", "outputs", "loss", "wrt", "keep", "kept", "free")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    steps: _containers.RepeatedCompositeFieldContainer[ProgramStep]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    loss: str
    wrt: _containers.RepeatedScalarFieldContainer[str]
    keep: bool
    kept: _containers.RepeatedScalarFieldContainer[str]
    free: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[ProgramStep, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., loss: _Optional[str] = ..., wrt: _Optional[_Iterable[str]] = ..., keep: bool = ..., kept: _Optional[_Iterable[str]] = ..., free: _Optional[_Iterable[str]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("outputs", "grads", "kept")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    kept: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., kept: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("name", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    options: _containers.MessageMap[str, Value]
    def __init__(self, name: _Optional[str] = ..., options: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class CreateTrainerRequest(_message.Message):
    __slots__ = ("model", "version", "optimizer", "loss", "loss_options")
    class LossOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    optimizer: Optimizer
    loss: str
    loss_options: _containers.MessageMap[str, Value]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., loss: _Optional[str] = ..., loss_options: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class CreateTrainerResponse(_message.Message):
    __slots__ = ("trainer", "parameters", "bytes")
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    trainer: str
    parameters: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    bytes: int
    def __init__(self, trainer: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., bytes: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("trainer", "inputs", "target", "output")
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    trainer: str
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    target: Tensor
    output: str
    def __init__(self, trainer: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("loss", "step")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    loss: float
    step: int
    def __init__(self, loss: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class ParametersRequest(_message.Message):
    __slots__ = ("trainer", "keep")
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    trainer: str
    keep: bool
    def __init__(self, trainer: _Optional[str] = ..., keep: bool = ...) -> None: ...

class ParametersResponse(_message.Message):
    __slots__ = ("parameters",)
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, parameters: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class PutRequestPart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutRequest
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[PutRequest, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class PutResponsePart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutResponse
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[PutResponse, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class GetRequestPart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetRequest
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[GetRequest, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class GetResponsePart(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetResponse
    chunk: bytes
    data: DataTransfer
    def __init__(self, header: _Optional[_Union[GetResponse, _Mapping]] = ..., chunk: _Optional[bytes] = ..., data: _Optional[_Union[DataTransfer, _Mapping]] = ...) -> None: ...

class OpenLaneRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenLaneResponse(_message.Message):
    __slots__ = ("grant", "port", "expires_in_seconds", "max_request_bytes", "local_socket", "local_proof")
    GRANT_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PROOF_FIELD_NUMBER: _ClassVar[int]
    grant: bytes
    port: int
    expires_in_seconds: float
    max_request_bytes: int
    local_socket: str
    local_proof: bytes
    def __init__(self, grant: _Optional[bytes] = ..., port: _Optional[int] = ..., expires_in_seconds: _Optional[float] = ..., max_request_bytes: _Optional[int] = ..., local_socket: _Optional[str] = ..., local_proof: _Optional[bytes] = ...) -> None: ...
