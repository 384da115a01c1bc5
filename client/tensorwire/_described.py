"""The server's descriptions, from the wire to the client's public types: the server
(``Info``), its models and their versions' statistics, and a session; both twins
share them."""

from __future__ import annotations

from tensorwire.types import (
    DeviceInfo,
    DynamicBatching,
    ModelInfo,
    ModelVersion,
    ServerInfo,
    SessionInfo,
    SessionsSummary,
    TensorSpec,
    VersionStatistics,
)
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Received
from tensorwire.wire.dtypes import NAME_BY_WIRE


def tensor_spec_from_wire(spec: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        spec.name,
        NAME_BY_WIRE.get(spec.dtype),
        None if spec.any_shape else tuple(spec.shape),
    )


def statistics_from_wire(m: pb.VersionStatistics) -> VersionStatistics:
    return VersionStatistics(
        model=m.model,
        version=m.version,
        requests=m.request_count,
        failures=m.failure_count,
        inferences=m.inference_count,
        executions=m.execution_count,
        queue_seconds=m.queue_seconds,
        compute_seconds=m.compute_seconds,
        batch_sizes=dict(sorted(m.batch_sizes.items())),
        rejected=m.rejected_count,
        expired=m.expired_count,
    )


def model_info_from_wire(m: pb.ModelInfo) -> ModelInfo:
    batching = None
    if m.HasField("dynamic_batching"):
        batching = DynamicBatching(
            m.dynamic_batching.max_queue_delay_seconds,
            tuple(m.dynamic_batching.preferred_batch_sizes),
        )
    return ModelInfo(
        m.name,
        m.kind,
        m.description,
        tuple(tensor_spec_from_wire(s) for s in m.inputs),
        tuple(tensor_spec_from_wire(s) for s in m.outputs),
        m.variadic,
        m.parameter_count,
        # A server from before model states lists only models that serve.
        state=m.state or "READY",
        reason=m.reason,
        versions=tuple(
            ModelVersion(
                v.version,
                v.state,
                v.reason,
                statistics_from_wire(v.statistics) if v.HasField("statistics") else None,
            )
            for v in m.versions
        ),
        max_batch_size=m.max_batch_size,
        dynamic_batching=batching,
        instances=tuple(m.instances),
        precision=m.precision,
        max_queue_size=m.max_queue_size,
        execution=m.execution,
        compiled_graphs=m.compiled_graphs,
        recompilations=m.recompilations,
    )


def server_info(received: Received[pb.InfoResponse]) -> ServerInfo:
    m = received.message
    sessions = None
    if m.HasField("sessions"):
        s = m.sessions
        sessions = SessionsSummary(
            count=s.count,
            bytes=s.bytes,
            quota_bytes=s.quota_bytes,
            ttl_seconds=s.ttl_seconds,
            max_sessions=s.max_sessions,
            losses=tuple(s.losses),
            optimizers=tuple(s.optimizers),
        )
    return ServerInfo(
        server_version=m.server_version,
        torch_version=m.torch_version,
        device=DeviceInfo(
            m.device.name,
            m.device.description,
            m.device.total_memory_bytes,
            m.device.free_memory_bytes,
        ),
        models={model.name: model_info_from_wire(model) for model in m.models},
        functions={f.name: f.description for f in m.functions},
        sessions=sessions,
    )


def session_info(received: Received[pb.DescribeSessionResponse]) -> SessionInfo:
    m = received.message
    return SessionInfo(
        session=m.session,
        handles=tuple(received.handle(t, f"handle {i}") for i, t in enumerate(m.handles)),
        trainers=tuple(m.trainers),
        bytes=m.bytes,
        quota_bytes=m.quota_bytes,
        ttl_seconds=m.ttl_seconds,
    )
