"""The server's Prometheus metrics: calls answered and their latency, payload bytes,
queue depth, batch sizes, calls running, sessions, device memory, the data port's
transfers and shared-memory regions. ``Metrics.finish`` records each finished call
and writes its access record; ``Metrics.serve`` exposes them over HTTP
(``metrics_endpoint``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import torch
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tensorwire_server import timeline
from tensorwire_server.calls import Call
from tensorwire_server.settings import AccessLog
from tensorwire_server.telemetry import access_log
from tensorwire_server.telemetry.devices import GpuCollector
from tensorwire_server.telemetry.metrics_endpoint import MetricsListener
from tensorwire_server.telemetry.tally import TallyRegistry
from tensorwire_server.telemetry.tracing import Tracer

#: Latency buckets of the per-model histograms: 100 µs to 10 s.
MODEL_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: The phases the per-model queue time adds up.
_QUEUED: Final = (timeline.QUEUE, timeline.BATCH)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (tests run several
    servers in one process). Each call's record is tallied as plain numbers and
    folded into the metrics when they are read (tally.py)."""

    def __init__(self, device: Any, access: AccessLog, tracer: Tracer | None = None) -> None:
        #: Which finished calls write an access record (the setting access_log).
        self.access = access
        #: Makes the calls' spans, where tracing is on.
        self.tracer = tracer
        self._live: dict[int, Call] = {}
        self.registry = TallyRegistry()
        self._tally = self.registry.tally
        r = self.registry
        self.requests = Counter(
            "tensorwire_requests",
            "RPCs answered, by method, model or function, and status code.",
            ["method", "target", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "tensorwire_request_seconds",
            "Time from a worker taking an RPC to its last response byte.",
            ["method"],
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
            ),
            registry=r,
        )
        self.payload = Counter(
            "tensorwire_payload_bytes",
            "Tensor payload bytes received (in) and sent (out).",
            ["direction"],
            registry=r,
        )
        self.waiting = Gauge(
            "tensorwire_queue_depth", "RPCs arrived and waiting for a worker thread.", registry=r
        )  # the server points it at its executor's queue
        self.batch = Histogram(
            "tensorwire_batch_size",
            "Requests run together in one forward pass, by model (1 until dynamic "
            "batching groups them).",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.running = Gauge("tensorwire_in_flight", "RPCs being worked on.", registry=r)
        # Read at each scrape: the calls begun and not yet ended (begin, end).
        self.running.set_function(lambda: len(self._live))
        # The server points these at its sessions.
        self.sessions = Gauge("tensorwire_sessions", "Sessions open.", registry=r)
        self.session_bytes = Gauge(
            "tensorwire_session_bytes",
            "Device bytes the sessions' tensors and trainers hold.",
            registry=r,
        )
        # Per model and version: where an inference's time went (timeline.py), its
        # bytes and its batches. Buckets from 100 µs to 10 s, about three a decade.
        model = ["model", "version"]
        self.model_queue = Histogram(
            "tensorwire_model_queue_seconds",
            "Time a model's requests waited: for a worker thread, and in the model's "
            "batch queue until their forward pass began.",
            model,
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.model_compute = Histogram(
            "tensorwire_model_compute_seconds",
            "Time a model's requests spent in forward and backward passes (a batch's "
            "pass counts for each request in it).",
            model,
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.model_latency = Histogram(
            "tensorwire_model_request_seconds",
            "Time from a model request's arrival to its last response byte.",
            model,
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.model_bytes = Counter(
            "tensorwire_model_payload_bytes",
            "Tensor payload bytes a model's requests sent (in) and its answers carried (out).",
            [*model, "direction"],
            registry=r,
        )
        self.model_batch = Histogram(
            "tensorwire_model_batch_size",
            "Requests run together in the forward pass that served a request.",
            model,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self._models: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._bytes_in = self.payload.labels("in")
        self._bytes_out = self.payload.labels("out")
        # Bounded: methods are the server's, targets known names or "unknown".
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self.memory = _DeviceMemory(device)
        r.register(self.memory)
        self._http: MetricsListener | None = None  # the HTTP endpoint, once served
        self._gpus: GpuCollector | None = None

    def finish(self, call: Call, code: str) -> None:
        """Record a finished call and write its access log line."""
        seconds = (time.perf_counter_ns() - call.timeline.start) / 1e9
        if self.tracer is not None:
            self.tracer.finish(call, code)
        # Each labelled child looked up once and kept: prometheus_client's labels()
        # checks and locks on every call, a few µs per metric per request.
        children = self._children
        key = (call.method, call.target, code)
        counted = children.get(key)
        if counted is None:
            counted = children[key] = (
                self.requests.labels(call.method, call.target, code),
                self.latency.labels(call.method),
                self.batch.labels(call.target),
            )
        tally = self._tally
        with tally.lock:
            tally.inc(counted[0])
            tally.observe(counted[1], seconds)
            tally.inc(self._bytes_in, call.bytes_in)
            tally.inc(self._bytes_out, call.bytes_out)
            if call.batch and code == "OK":
                tally.observe(counted[2], call.batch)
            if call.version:
                self._model(call, seconds)
        if self.access == "none" or (self.access == "errors" and code == "OK"):
            return
        access_log.write(call, code, seconds)

    def _model(self, call: Call, seconds: float) -> None:
        """Record an inference in its model's metrics (the tally's lock held)."""
        key = (call.target, call.version)
        children = self._models.get(key)
        if children is None:
            labels = (call.target, str(call.version))
            children = self._models[key] = (
                self.model_queue.labels(*labels),
                self.model_compute.labels(*labels),
                self.model_latency.labels(*labels),
                self.model_bytes.labels(*labels, "in"),
                self.model_bytes.labels(*labels, "out"),
                self.model_batch.labels(*labels),
            )
        queue, compute, latency, bytes_in, bytes_out, batch = children
        # Timeline.total of both, in one pass over the spans.
        queued = computed = 0
        for name, start, end, _ in call.timeline.spans:
            if name in _QUEUED:
                queued += end - start
            elif name in timeline.COMPUTE:
                computed += end - start
        tally = self._tally
        tally.observe(queue, queued / 1e9)
        tally.observe(compute, computed / 1e9)
        tally.observe(latency, seconds)
        tally.inc(bytes_in, call.bytes_in)
        tally.inc(bytes_out, call.bytes_out)
        if call.batch:
            tally.observe(batch, call.batch)

    def begin(self, call: Call) -> None:
        """Count ``call`` as running until ``end``."""
        self._live[id(call)] = call
        if self.tracer is not None:
            self.tracer.begin(call)

    def end(self, call: Call) -> None:
        """``call`` no longer runs."""
        self._live.pop(id(call), None)

    def count_models(self, is_model: Callable[[str], bool]) -> None:
        """Report the calls running per model (``is_model`` tells a model's name from a
        function's), counted at each scrape from the calls running."""
        self.registry.register(_ModelsInFlight(self._live, is_model))

    def count_gpus(self, devices: Sequence[Any]) -> None:
        """Report the utilisation and memory of the GPUs among ``devices``, where NVML
        answers (telemetry.devices); nothing on a CPU server."""
        if self._gpus is not None:
            return
        self._gpus = GpuCollector.open(devices)
        if self._gpus is not None:
            self.registry.register(self._gpus)

    def count_data_port(self, totals: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """Count the data port's transfers and payload bytes per path, read from
        ``totals`` (path -> (transfers, bytes)) at each scrape;
        ``tensorwire_payload_bytes`` counts every payload whichever way it went."""
        self.registry.register(_DataPortTotals(totals))

    def count_shared_memory(
        self, regions: Callable[[], dict[str, int]], short: Callable[[], int]
    ) -> None:
        """Report the shared-memory regions registered, per kind, from ``regions``
        (kind -> count), and the copies a client's shrink cut short, from ``short``."""
        self.registry.register(_SharedMemory(regions, short))

    def serve(self, host: str, port: int) -> int:
        """Expose the metrics over HTTP at ``host:port`` (bounded: metrics_endpoint.py); the
        port bound."""
        self._http = MetricsListener(self.registry, host, port)
        return self._http.port

    def close(self) -> None:
        """Stop the HTTP endpoint and drop its connections, if one runs."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None


class _ModelsInFlight(Collector):
    """The calls running per model, read at each scrape."""

    def __init__(self, live: dict[int, Call], is_model: Callable[[str], bool]) -> None:
        self.live = live
        self.is_model = is_model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: dict[str, int] = {}
        for call in list(self.live.values()):  # the loop adds and drops calls meanwhile
            if call.target and self.is_model(call.target):
                counts[call.target] = counts.get(call.target, 0) + 1
        family = GaugeMetricFamily(
            "tensorwire_model_in_flight",
            "Requests to each model being worked on.",
            labels=["model"],
        )
        for name, count in sorted(counts.items()):
            family.add_metric([name], count)
        yield family


class _DataPortTotals(Collector):
    """The data port's counters, kept by its connection threads, read at each scrape."""

    def __init__(self, totals: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        transfers = CounterMetricFamily(
            "tensorwire_data_plane_transfers",
            "Streamed calls whose payloads went over the data port, per path (tcp: the "
            "data port; shared_memory: a client on the same host).",
            labels=["path"],
        )
        moved = CounterMetricFamily(
            "tensorwire_data_plane_bytes",
            "Payload bytes the data port moved, both ways, per path.",
            labels=["path"],
        )
        for path, (count, size) in self.totals().items():
            transfers.add_metric([path], count)
            moved.add_metric([path], size)
        yield transfers
        yield moved


class _SharedMemory(Collector):
    """Shared-memory regions and copies cut short, read at each scrape."""

    def __init__(self, regions: Callable[[], dict[str, int]], short: Callable[[], int]) -> None:
        self.regions = regions
        self.short = short

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        registered = GaugeMetricFamily(
            "tensorwire_shared_memory_regions",
            "Shared-memory regions clients registered, per kind (system, cuda).",
            labels=["kind"],
        )
        for kind, count in self.regions().items():
            registered.add_metric([kind], count)
        yield registered
        yield CounterMetricFamily(
            "tensorwire_shared_memory_short_copies",
            "Copies to or from a client's shared-memory object cut short (the client shrank "
            "it under the server, or /dev/shm was full); each failed one request.",
            value=self.short(),
        )


class _DeviceMemory(Collector):
    """Device memory in use and at its peak, read at each scrape."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used, peak = _memory(self.device)
        yield GaugeMetricFamily(
            "tensorwire_device_memory_bytes", "Device memory in use by tensors.", value=used
        )
        yield GaugeMetricFamily(
            "tensorwire_device_memory_peak_bytes",
            "Peak device memory in use by tensors since the server started.",
            value=peak,
        )


def _memory(device: Any) -> tuple[int, int]:
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    # The CPU's tensors live in the process: its resident and peak resident memory.
    status = _proc_status()
    return status.get("VmRSS", 0), status.get("VmHWM", 0)


def _proc_status() -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values
