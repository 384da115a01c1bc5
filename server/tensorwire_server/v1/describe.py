"""What tensorwire.v1 says about the server and its models: Info's answer, each model's
signature, configuration, state and versions, their statistics and tensor specs, as
wire messages."""

from __future__ import annotations

from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server.core.service import ServerInfo
from tensorwire_server.models.config import ModelConfig
from tensorwire_server.models.model import IOSpec, Model
from tensorwire_server.models.registry import FAILED, READY, ModelEntry
from tensorwire_server.models.statistics import StatsSnapshot


def info_to_wire(info: ServerInfo) -> pb.InfoResponse:
    """Info's answer."""
    device = info.device
    sessions = info.sessions
    return pb.InfoResponse(
        server_version=info.server_version,
        torch_version=info.torch_version,
        device=pb.DeviceInfo(
            name=device.name,
            description=device.description,
            total_memory_bytes=device.total_memory,
            free_memory_bytes=device.free_memory,
        ),
        models=[model_to_wire(entry) for entry in info.models],
        functions=[pb.FunctionInfo(name=n, description=d) for n, d in info.functions],
        sessions=pb.SessionsSummary(
            count=sessions.count,
            bytes=sessions.bytes,
            quota_bytes=sessions.quota,
            ttl_seconds=sessions.ttl,
            max_sessions=sessions.max_sessions,
            losses=sessions.losses,
            optimizers=sessions.optimizers,
        ),
    )


def model_to_wire(entry: ModelEntry) -> pb.ModelInfo:
    """One model: its signature, configuration, state and every version."""
    config = entry.config
    newest = entry.newest()
    # The signature the newest version's files carry, else the configuration's.
    signature: Model | ModelConfig = newest.model if newest is not None else config
    info = pb.ModelInfo(
        name=config.name,
        description=config.description,
        inputs=[spec_to_wire(s) for s in signature.inputs],
        outputs=[spec_to_wire(s) for s in signature.outputs],
        variadic=config.variadic,
        state=entry.state,
        reason=entry.reason,
        max_batch_size=config.max_batch_size,
        precision=config.precision,
        max_queue_size=config.max_queue_size,
    )
    if newest is not None:
        model = newest.model
        info.kind = model.kind
        info.execution = model.execution
        if model.compile_stats is not None:
            info.compiled_graphs = model.compile_stats.graphs
            info.recompilations = model.compile_stats.recompilations
        info.description = model.description or config.description
        info.parameter_count = model.parameter_count()
        info.instances.extend(str(i.device) for i in newest.instances)
    if newest is not None and newest.batcher is not None and config.batching is not None:
        info.dynamic_batching.max_queue_delay_seconds = config.batching.max_queue_delay
        info.dynamic_batching.preferred_batch_sizes.extend(config.batching.preferred_batch_sizes)
    for number, served in entry.versions.items():
        info.versions.add(
            version=number, state=READY, statistics=statistics_to_wire(served.stats.snapshot())
        )
    for number, reason in sorted(entry.failures.items(), reverse=True):
        if number:
            info.versions.add(version=number, state=FAILED, reason=reason)
    return info


def statistics_to_wire(snapshot: StatsSnapshot) -> pb.VersionStatistics:
    """One version's counters."""
    return pb.VersionStatistics(
        model=snapshot.model,
        version=snapshot.version,
        request_count=snapshot.requests,
        failure_count=snapshot.failures,
        inference_count=snapshot.inferences,
        execution_count=snapshot.executions,
        queue_seconds=snapshot.queue_seconds,
        compute_seconds=snapshot.compute_seconds,
        batch_sizes=snapshot.batch_sizes,
        rejected_count=snapshot.rejected,
        expired_count=snapshot.expired,
    )


def spec_to_wire(spec: IOSpec) -> pb.TensorSpec:
    """An input, output or parameter: no dtype, no shape where any goes."""
    return pb.TensorSpec(
        name=spec.name,
        dtype=WIRE_BY_NAME[spec.dtype] if spec.dtype else pb.DTYPE_UNSPECIFIED,  # type: ignore[arg-type]
        shape=spec.shape or (),
        any_shape=spec.shape is None,
    )
