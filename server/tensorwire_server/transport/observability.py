"""What operators see: Prometheus metrics, one access log record per request, and the
request id that ties a client's error to the server's log.

The Gate opens a ``Call`` record for every RPC; the servicer adds what only it knows
(the model or function, payload bytes) through ``current()``; the Gate closes the
record with its status code, and the record becomes metrics and a log line.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tensorwire_server.settings import AccessLog
from tensorwire_server.transport.metrics_endpoint import MetricsListener

access_log = logging.getLogger("tensorwire_server.access")

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_PROCESS_ID: Final = secrets.token_hex(8)
_COUNT = itertools.count(secrets.randbits(32))


@dataclass
class Call:
    """One RPC as it is being answered."""

    method: str
    request_id: str
    caller: str = ""
    target: str = ""  # model or function
    bytes_in: int = 0
    bytes_out: int = 0
    #: Requests in the forward pass that served this one (0: no model ran).
    batch: int = 0
    #: When (``time.monotonic()``) the caller stops waiting; None: never.
    deadline: float | None = None
    #: The session the call names in its metadata; empty: none.
    session: str = ""
    started: float = field(default_factory=time.perf_counter)
    #: Records the call (metrics, access log) with its status code, once; set by the
    #: gate. An error is recorded before its status is sent (rpc.abort): a client
    #: that has its answer finds it counted.
    record: Callable[[str], None] | None = field(default=None, repr=False)


_CURRENT: ContextVar[Call | None] = ContextVar("call", default=None)


def current() -> Call | None:
    """The call being answered on this thread, if any."""
    return _CURRENT.get()


def request_id(given: str) -> str:
    """The client's own ``x-request-id`` (``given``) if it is a sane token, else a new
    one: 32 hex digits, a random half for this process and a count, as unique as a
    uuid4 for a process's calls and a tenth of its cost."""
    if given and _SAFE_ID.fullmatch(given):
        return given
    return f"{_PROCESS_ID}{next(_COUNT):016x}"


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (tests run several
    servers in one process)."""

    def __init__(self, device: Any, access: AccessLog) -> None:
        #: Which finished calls write an access record (the setting access_log).
        self.access = access
        self.registry = CollectorRegistry()
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
        # The server points these at its sessions.
        self.sessions = Gauge("tensorwire_sessions", "Sessions open.", registry=r)
        self.session_bytes = Gauge(
            "tensorwire_session_bytes",
            "Device bytes the sessions' tensors and trainers hold.",
            registry=r,
        )
        self._bytes_in = self.payload.labels("in")
        self._bytes_out = self.payload.labels("out")
        # Bounded: methods are the server's, targets known names or "unknown".
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.memory = _DeviceMemory(device)
        r.register(self.memory)
        self._http: MetricsListener | None = None  # the HTTP endpoint, once served

    def finish(self, call: Call, code: str) -> None:
        """Record a finished call and write its access log line."""
        seconds = time.perf_counter() - call.started
        # Each labelled child looked up once and kept: prometheus_client's labels()
        # checks and locks on every call, a few µs per metric per request.
        children = self._children
        key = (call.method, call.target, code)
        counted = children.get(key)
        if counted is None:
            counted = children[key] = (
                self.requests.labels(call.method, call.target, code),
                self.latency.labels(call.method),
            )
        counted[0].inc()
        counted[1].observe(seconds)
        self._bytes_in.inc(call.bytes_in)
        self._bytes_out.inc(call.bytes_out)
        if call.batch and code == "OK":
            self.batch.labels(call.target).observe(call.batch)
        if self.access == "none" or (self.access == "errors" and code == "OK"):
            return
        access_log.info(
            "%s %s %s %.1f ms in=%d out=%d",
            call.method,
            call.target or "-",
            code,
            seconds * 1e3,
            call.bytes_in,
            call.bytes_out,
            extra={
                "fields": {
                    "request_id": call.request_id,
                    "method": call.method,
                    "target": call.target,
                    "code": code,
                    "seconds": round(seconds, 6),
                    "bytes_in": call.bytes_in,
                    "bytes_out": call.bytes_out,
                    "caller": call.caller,
                }
            },
        )

    def count_data_plane(self, totals: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """Count the data plane's transfers and payload bytes per path, read from
        ``totals`` (path -> (transfers, bytes)) at each scrape;
        ``tensorwire_payload_bytes`` counts every payload whichever way it went."""
        self.registry.register(_DataPlaneTotals(totals))

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


class _DataPlaneTotals(Collector):
    """The data plane's counters, kept by its connection threads, read at each scrape."""

    def __init__(self, totals: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        transfers = CounterMetricFamily(
            "tensorwire_data_plane_transfers",
            "Streamed calls whose payloads went over the data plane, per path (tcp: the "
            "data port; shared_memory: a client on the same host).",
            labels=["path"],
        )
        moved = CounterMetricFamily(
            "tensorwire_data_plane_bytes",
            "Payload bytes the data plane moved, both ways, per path.",
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request id of the
    call being answered, and an access record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = current()
        if call is not None:
            entry["request_id"] = call.request_id
        entry.update(getattr(record, "fields", {}))  # an access record's own keys
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def set_current(call: Call | None) -> Any:
    """Make ``call`` the current one; a token for ``reset_current``."""
    return _CURRENT.set(call)


def reset_current(token: Any) -> None:
    """Restore the call current before ``set_current``."""
    _CURRENT.reset(token)
