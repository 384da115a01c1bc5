"""The models a server serves: every version of every model, its instances on the
devices, its batcher and statistics; versions added, replaced and retired while
requests run."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorwire.errors import (
    DeadlineExceededError,
    NotFoundError,
    ResourceExhaustedError,
    listed,
    shown,
)
from tensorwire_server.device.tensors import resolve_device
from tensorwire_server.models import compiled
from tensorwire_server.models.batching import Batcher
from tensorwire_server.models.config import ConfigError, ModelConfig
from tensorwire_server.models.model import Model
from tensorwire_server.models.statistics import VersionStats
from tensorwire_server.named import Named

log = logging.getLogger(__name__)

READY = "READY"
FAILED = "FAILED"
_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class Instance:
    """One copy of a model on one device, with its own CUDA stream. Instances on the
    same device share the module's weights: inference only reads them."""

    device: torch.device
    module: nn.Module
    stream: Any = None  # torch.cuda.Stream on CUDA
    #: Requests running on it that were not batched (for balancing).
    busy: int = 0

    def context(self) -> AbstractContextManager[Crossing]:
        """Make this instance's stream the current one, ordered against the stream
        that was current (the ambient one: the device's default stream on a worker).

        Pool streams do not synchronize with the default stream (PyTorch's CUDA
        semantics, "CUDA streams"): inputs uploaded on the ambient stream (programs,
        staging, CUDA shared-memory reads, Put) would be read here before they land,
        and outputs made here read there before they are written. So this stream
        waits for the ambient one on entry, the ambient one for this on exit, and
        tensors that cross are recorded on the stream that reads them (``Crossing``)
        so the caching allocator does not hand their blocks on early. Without a
        stream (the CPU) nothing changes: one shared object, no generator."""
        if self.stream is None:
            return _NO_STREAM
        return self._on_stream()

    @contextmanager
    def _on_stream(self) -> Iterator[Crossing]:
        ambient = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(ambient)
        try:
            with torch.cuda.stream(self.stream):
                yield Crossing(self.stream, ambient)
        finally:
            ambient.wait_stream(self.stream)


class Crossing:
    """Tensors crossing between an instance's stream and the ambient stream: each is
    recorded on the stream that will use it (``Tensor.record_stream``), so that its
    memory is not reused before the work queued there when it is freed is done.
    Nothing on the CPU."""

    def __init__(self, stream: Any = None, ambient: Any = None) -> None:
        self.stream = stream
        self.ambient = ambient

    def inward(self, tensor: torch.Tensor) -> torch.Tensor:
        """An input made on another stream, now used on the instance's."""
        if self.stream is not None and tensor.is_cuda and tensor.device == self.stream.device:
            tensor.record_stream(self.stream)
        return tensor

    def outward(self, tensor: torch.Tensor) -> torch.Tensor:
        """An output made on the instance's stream, handed to the ambient stream (a
        session keeps it, a function or Get reads it there)."""
        if self.ambient is not None and tensor.is_cuda and tensor.device == self.ambient.device:
            tensor.record_stream(self.ambient)
        return tensor


_SAME_STREAM = Crossing()


class _SameStream:
    """``Instance.context`` without a stream: ``_SAME_STREAM``, and nothing to undo."""

    __slots__ = ()

    def __enter__(self) -> Crossing:
        return _SAME_STREAM

    def __exit__(self, *exc: object) -> None:
        return None


_NO_STREAM = _SameStream()


#: Runs one forward pass of a version on an instance: bound inputs in, arrays out.
Forward = Callable[["ServedVersion", Instance, Named[np.ndarray]], Named[np.ndarray]]


class ServedVersion:
    """One loaded version of a model: its instances, batcher, statistics and the
    requests in flight on it."""

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        model: Model,
        instances: list[Instance],
        forward: Forward,
    ) -> None:
        self.config = config
        self.version = version
        self.model = model
        self.instances = instances
        self.stats = VersionStats(config.name, version)
        self.autocast = _AUTOCAST.get(config.precision)
        self._forward = forward
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._in_flight = 0
        self._running = 0  # unbatched requests in progress, bounded by max_queue_size
        self.retired = False
        self.batcher: Batcher[Instance] | None = None
        if config.batching is not None and config.max_batch_size > 0:
            self.batcher = Batcher(
                config.name,
                instances,
                lambda instance, inputs: forward(self, instance, inputs),
                config.max_batch_size,
                config.batching,
                config.max_queue_size,
                self.stats,
            )

    @property
    def name(self) -> str:
        """The model's name."""
        return self.config.name

    def enter(self) -> bool:
        """Count a request in; False once the version is retired."""
        with self._lock:
            if self.retired:
                return False
            self._in_flight += 1
            return True

    def exit(self) -> None:
        """Count a request out."""
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0 and self.retired:  # only retire() waits
                self._drained.notify_all()

    def retire(self, timeout: float | None) -> bool:
        """Take no new requests; wait up to ``timeout`` for those in flight; release the
        instances. False when requests were still running at the timeout."""
        with self._lock:
            self.retired = True
            drained = self._drained.wait_for(lambda: self._in_flight == 0, timeout)
        if drained:
            self.instances = []
            self.batcher = None
        return drained

    def pick(self) -> Instance:
        """The instance with the fewest unbatched requests running."""
        instances = self.instances
        if len(instances) == 1:
            return instances[0]
        return min(instances, key=lambda i: i.busy)

    def run(
        self,
        inputs: Named[np.ndarray],
        deadline: float | None,
        forward: Callable[[Instance, Named[np.ndarray]], Named[np.ndarray]] | None = None,
    ) -> tuple[Named[np.ndarray], int]:
        """One unbatched forward pass on the least busy instance (by ``forward``, else
        the usual one); outputs and rows."""
        if deadline is not None and time.monotonic() >= deadline:
            self.stats.expired(0.0)
            raise DeadlineExceededError("the deadline passed before the request could run")
        with self._lock:
            if self._running >= self.config.max_queue_size:
                self.stats.rejected()
                raise ResourceExhaustedError(
                    f"model {self.name!r} has {self._running} requests running, its "
                    "max_queue_size: try again later"
                )
            self._running += 1
        try:
            # ``alone``, written out: a generator context manager costs a few µs.
            instance = self.pick()
            instance.busy += 1
            rows = _rows(inputs, self.config)
            started = time.monotonic()
            ok = False
            try:
                if forward is None:
                    outputs = self._forward(self, instance, inputs)
                else:
                    outputs = forward(instance, inputs)
                ok = True
                return outputs, rows
            finally:
                instance.busy -= 1
                self.stats.ran(rows, time.monotonic() - started, ok)
        finally:
            with self._lock:
                self._running -= 1

    @contextmanager
    def alone(self, inputs: Named[np.ndarray]) -> Iterator[Instance]:
        """The least busy instance, counted busy while the block runs one request's
        own pass (a forward, or a forward and backward), which the statistics count."""
        instance = self.pick()
        instance.busy += 1  # a hint for balancing: a lost update only skews the choice
        started = time.monotonic()
        ok = False
        try:
            yield instance
            ok = True
        finally:
            instance.busy -= 1
            self.stats.ran(_rows(inputs, self.config), time.monotonic() - started, ok)

    def queued(self) -> int:
        """Requests waiting in the batcher's queue."""
        return self.batcher.queued() if self.batcher is not None else 0


@dataclass
class ModelEntry:
    """A model by name: its configuration, the versions serving (newest first) and
    the versions (or the whole model, as version 0) that failed to load."""

    config: ModelConfig
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    def newest(self) -> ServedVersion | None:
        """The newest version serving, if any."""
        return self.versions[max(self.versions)] if self.versions else None

    @property
    def state(self) -> str:
        """READY when a version serves, else FAILED."""
        return READY if self.versions else FAILED

    @property
    def reason(self) -> str:
        """Why the model or some version of it did not load; empty when all did."""
        return "; ".join(
            reason if version == 0 else f"version {version}: {reason}"
            for version, reason in sorted(self.failures.items())
        )


class _InFlight:
    """``ModelRegistry.using``'s block: counts its version out when it ends (a class,
    not a generator: it is on every request's path)."""

    __slots__ = ("served",)

    def __init__(self, served: ServedVersion) -> None:
        self.served = served

    def __enter__(self) -> ServedVersion:
        return self.served

    def __exit__(self, *exc: object) -> None:
        self.served.exit()


def server_devices(setting: str) -> list[torch.device]:
    """The devices a server with ``device=setting`` places instances on by default:
    every visible GPU for auto (when there is one) and cuda, else the one named."""
    device = resolve_device(setting)
    if device.type == "cuda" and setting in ("auto", "cuda"):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


class ModelRegistry:
    """Every model the server serves, by name. Lookups are cheap and lock-free for
    readers of a snapshot; changes swap whole entries under a lock."""

    def __init__(self, devices: Sequence[torch.device], forward: Forward) -> None:
        self.devices = list(devices)
        self._forward = forward
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}

    # ------------------------------------------------------------------ reading

    def entries(self) -> dict[str, ModelEntry]:
        """A snapshot of every model by name."""
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        entry = self._entries.get(name) if isinstance(name, str) else None
        return entry is not None and bool(entry.versions)

    def batched(self, name: str) -> bool:
        """Whether a version of ``name`` serving batches its requests."""
        entry = self._entries.get(name)  # a list, not a generator: asked on every Infer
        return entry is not None and any([s.batcher is not None for s in entry.versions.values()])

    def names(self) -> list[str]:
        """The models with a version serving, sorted."""
        return sorted(n for n, e in self._entries.items() if e.versions)

    def using(self, name: str, version: int = 0) -> AbstractContextManager[ServedVersion]:
        """The version to run (the newest serving when ``version`` is 0), counted in
        flight while the block runs so that unloading it waits for the request."""
        for _ in range(3):  # a version retired between lookup and entry: look again
            served = self._find(name, version)
            if served.enter():
                return _InFlight(served)
        raise NotFoundError(f"model {shown(name)} is being unloaded")

    def _find(self, name: str, version: int) -> ServedVersion:
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            if entry is not None:
                raise NotFoundError(f"model {shown(name)} is not serving: {entry.reason}")
            raise NotFoundError(f"model {shown(name)} not found; models: {listed(self.names())}")
        if version == 0:
            newest = entry.newest()
            assert newest is not None
            return newest
        served = entry.versions.get(version)
        if served is None:
            raise NotFoundError(
                f"model {shown(name)} has no version {version} serving; versions: "
                f"{listed(str(v) for v in sorted(entry.versions, reverse=True))}"
            )
        return served

    # ------------------------------------------------------------------ loading

    def serve(self, config: ModelConfig, versions: dict[int, Model | str]) -> ModelEntry:
        """Place each loaded version (a Model) on its devices and record each failure
        (a reason); return the entry, not yet serving (``install`` it)."""
        entry = ModelEntry(config)
        for number, loaded in versions.items():
            if isinstance(loaded, str):
                entry.failures[number] = loaded
                continue
            try:
                entry.versions[number] = self._place(config, number, loaded)
            except ConfigError as exc:
                entry.failures[number] = str(exc)
        entry.versions = dict(sorted(entry.versions.items(), reverse=True))
        return entry

    def install(self, entry: ModelEntry, grace: float | None = None) -> None:
        """Serve ``entry`` under its name; the versions it replaces take no new
        requests, finish those in flight (up to ``grace`` seconds), then go."""
        with self._lock:
            old = self._entries.get(entry.config.name)
            self._entries[entry.config.name] = entry
        if old is not None:
            for served in old.versions.values():
                self._release(served, grace)

    def unload(self, name: str, version: int = 0, grace: float | None = None) -> list[int]:
        """Stop serving ``name`` (or one version); return the versions unloaded once
        their requests have finished and their memory is released."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.versions:
                raise NotFoundError(f"model {shown(name)} is not loaded")
            if version == 0:
                gone = list(entry.versions.values())
                del self._entries[name]
            else:
                if version not in entry.versions:
                    raise NotFoundError(f"model {shown(name)} has no version {version} loaded")
                gone = [entry.versions[version]]
                remaining = {v: s for v, s in entry.versions.items() if v != version}
                if remaining:
                    self._entries[name] = ModelEntry(entry.config, remaining, entry.failures)
                else:
                    del self._entries[name]
        for served in gone:
            self._release(served, grace)
        return [served.version for served in gone]

    def _release(self, served: ServedVersion, grace: float | None) -> None:
        if not served.retire(grace):
            log.warning(
                "model %r version %d: requests still running after %s s; its memory goes "
                "when they finish",
                served.name,
                served.version,
                grace,
            )
        log.info("model %r version %d unloaded", served.name, served.version)
        if any(d.type == "cuda" for d in self.devices):
            torch.cuda.empty_cache()

    def _place(self, config: ModelConfig, version: int, model: Model) -> ServedVersion:
        devices = self._devices(config)
        instances: list[Instance] = []
        for i, device in enumerate(devices):
            module = model.module if i == 0 else copy.deepcopy(model.module)
            module.to(device)
            with suppress(NotImplementedError):  # torch.export modules keep their mode
                module.eval()
            for _ in range(config.instances):
                stream = instance_stream(device) if device.type == "cuda" else None
                instances.append(Instance(device, module, stream))
        served = ServedVersion(config, version, model, instances, self._forward)
        # Compiled before it serves: AOTInductor packages placed, torch.compile warmed up.
        compiled.prepare(config, model, instances, lambda i, x: self._forward(served, i, x))
        for request in config.warmup:
            inputs = [
                (name, compiled.warmup_array(spec.shape, spec.dtype, spec.fill))
                for name, spec in request.items()
            ]
            for instance in instances:
                try:
                    self._forward(served, instance, inputs)
                except Exception as exc:
                    raise ConfigError(f"warm-up on {instance.device} failed: {exc}") from exc
        return served

    def _devices(self, config: ModelConfig) -> list[torch.device]:
        if not config.devices:
            return self.devices
        devices: list[torch.device] = []
        for name in config.devices:
            if name == "cuda":
                if not torch.cuda.is_available():
                    raise ConfigError("devices names cuda, and torch sees no CUDA GPU")
                devices.extend(torch.device("cuda", i) for i in range(torch.cuda.device_count()))
                continue
            device = torch.device(name)
            if device.type == "cuda" and (
                not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
            ):
                raise ConfigError(f"devices names {name}, which torch does not see")
            devices.append(device)
        return list(dict.fromkeys(devices))


def instance_stream(device: torch.device) -> Any:
    """A stream for an instance on ``device``: from torch's pool of default priority.
    Staging takes its streams from the high-priority pool (``device.staging``), a
    different set of streams, so that a stager never shares a stream, and its waits,
    with a model (torch.cuda.Stream: each priority has its own round-robin pool)."""
    return torch.cuda.Stream(device, priority=0)  # type: ignore[no-untyped-call]


def _rows(inputs: Named[np.ndarray], config: ModelConfig) -> int:
    """Rows a request runs: its first dimension for a model with a batch dimension."""
    if config.max_batch_size > 0 and inputs and inputs[0][1].ndim > 0:
        return int(inputs[0][1].shape[0])
    return 1


__all__ = [
    "FAILED",
    "READY",
    "Crossing",
    "Instance",
    "ModelEntry",
    "ModelRegistry",
    "ServedVersion",
]
