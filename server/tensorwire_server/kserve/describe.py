"""What the v2 protocol says about models, from the registry: metadata, configuration,
statistics and the repository index."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from tensorwire_server.kserve.codec import DATATYPE_OF
from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb
from tensorwire_server.models.model import IOSpec
from tensorwire_server.models.registry import ModelEntry, ServedVersion
from tensorwire_server.models.statistics import StatsSnapshot

#: The state of a model version that serves, and of one that does not.
READY: Final = "READY"
UNAVAILABLE: Final = "UNAVAILABLE"
_NS: Final = 1e9


def platform(served: ServedVersion) -> str:
    """The model's platform: what it was loaded from ("pytorch_torchscript", ...)."""
    return f"pytorch_{served.model.kind}"


def metadata_to_wire(entry: ModelEntry, served: ServedVersion) -> pb.ModelMetadataResponse:
    """ModelMetadata of ``served``. A model that fixes no datatype (identity, echo)
    has an empty one, and one that fixes no rank an empty shape: the protocol has no
    wildcard for either. A model taking inputs of any names lists none."""
    model = served.model
    return pb.ModelMetadataResponse(
        name=served.name,
        versions=[str(v) for v in entry.versions],
        platform=platform(served),
        inputs=[_spec_to_wire(s) for s in model.inputs],
        outputs=[_spec_to_wire(s) for s in model.outputs],
    )


def _spec_to_wire(spec: IOSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name,
        datatype=DATATYPE_OF.get(spec.dtype or "", ""),
        shape=spec.shape or (),
    )


def config_to_wire(served: ServedVersion) -> pb.ModelConfig:
    """The configuration ``served`` runs under, in the protocol's terms."""
    settings = served.config
    model = served.model
    batched = settings.max_batch_size > 0
    result = pb.ModelConfig(
        name=served.name,
        platform=platform(served),
        backend="tensorwire",
        max_batch_size=settings.max_batch_size,
        input=[
            pb.ModelInput(name=s.name, data_type=_type(s), dims=_dims(s, batched))  # type: ignore[arg-type]
            for s in model.inputs
        ],
        output=[
            pb.ModelOutput(name=s.name, data_type=_type(s), dims=_dims(s, batched))  # type: ignore[arg-type]
            for s in model.outputs
        ],
    )
    versions = settings.versions
    if versions == "all":
        result.version_policy.all.SetInParent()
    elif isinstance(versions, str):  # "latest:N"
        result.version_policy.latest.num_versions = int(versions.partition(":")[2])
    else:
        result.version_policy.specific.versions.extend(versions)
    devices = list(dict.fromkeys(i.device for i in served.instances))
    for device in devices:
        group = result.instance_group.add(name=str(device), count=settings.instances)
        if device.type == "cuda":
            group.kind = pb.ModelInstanceGroup.KIND_GPU
            group.gpus.append(device.index or 0)
        else:
            group.kind = pb.ModelInstanceGroup.KIND_CPU
    if served.batcher is not None and settings.batching is not None:
        batching = result.dynamic_batching
        batching.SetInParent()  # present even with no preferred sizes and no delay
        batching.preferred_batch_size.extend(settings.batching.preferred_batch_sizes)
        batching.max_queue_delay_microseconds = round(settings.batching.max_queue_delay * 1e6)
    for key, value in (
        ("description", model.description or settings.description),
        ("precision", settings.precision),
        ("max_queue_size", str(settings.max_queue_size)),
    ):
        result.parameters[key].string_value = value
    return result


def _type(spec: IOSpec) -> int:
    datatype = DATATYPE_OF.get(spec.dtype or "")
    return pb.DataType.Value(f"TYPE_{datatype}") if datatype else pb.TYPE_INVALID


def _dims(spec: IOSpec, batched: bool) -> tuple[int, ...]:
    # With a batch dimension, the protocol's dims leave it out (max_batch_size has it).
    shape = spec.shape or ()
    return shape[1:] if batched and shape else shape


def statistics_to_wire(snapshot: StatsSnapshot) -> pb.ModelStatistics:
    """One version's counters. tensorwire measures time queued and computing; the
    per-request durations of success and fail it does not (ns 0)."""
    result = pb.ModelStatistics(
        name=snapshot.model,
        version=str(snapshot.version),
        inference_count=snapshot.inferences,
        execution_count=snapshot.executions,
    )
    stats = result.inference_stats
    stats.success.count = snapshot.requests - snapshot.failures
    stats.fail.count = snapshot.failures
    stats.queue.count = snapshot.requests - snapshot.rejected
    stats.queue.ns = round(snapshot.queue_seconds * _NS)
    stats.compute_infer.count = snapshot.executions
    stats.compute_infer.ns = round(snapshot.compute_seconds * _NS)
    for size, count in snapshot.batch_sizes.items():
        result.batch_stats.add(batch_size=size).compute_infer.count = count
    return result


def index_to_wire(
    entries: dict[str, ModelEntry], unloaded: Iterable[str], ready_only: bool
) -> pb.RepositoryIndexResponse:
    """Every model by name: each version serving (newest first), each version or
    model that failed to load, and each repository model that is not loaded."""
    rows: list[tuple[str, pb.RepositoryIndexResponse.ModelIndex]] = []
    for name, entry in entries.items():
        for number in entry.versions:
            rows.append(
                (
                    name,
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=name, version=str(number), state=READY
                    ),
                )
            )
        for number, reason in sorted(entry.failures.items(), reverse=True):
            rows.append(
                (
                    name,
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=name,
                        version=str(number) if number else "",
                        state=UNAVAILABLE,
                        reason=reason,
                    ),
                )
            )
    for name in unloaded:
        if name not in entries:
            rows.append(
                (
                    name,
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=name, state=UNAVAILABLE, reason="unloaded"
                    ),
                )
            )
    response = pb.RepositoryIndexResponse()
    for _, row in sorted(rows, key=lambda r: r[0]):
        if row.state == READY or not ready_only:
            response.models.append(row)
    return response
