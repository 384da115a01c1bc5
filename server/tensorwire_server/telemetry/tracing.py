"""OpenTelemetry traces of the calls, continued from the caller's W3C trace context.

Each call's span starts as the call arrives (its context is known then, so that the
requests of one batch can link to each other) and everything else is built after the
call ends, on a thread of the tracer's own, from the phases the call's timeline
recorded: no tracing code runs between a request's arrival and its response but the
span's start. Off unless the standard ``OTEL_*`` variables ask for an exporter
(``OTEL_TRACES_EXPORTER``, or an OTLP endpoint); sampling follows
``OTEL_TRACES_SAMPLER`` (parent-based by default: a caller's sampled trace is
followed). Needs the ``tracing`` extra (the OpenTelemetry SDK and OTLP exporter).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import grpc

from tensorwire_server.calls import Call
from tensorwire_server.timeline import BATCH, EVENTS

log = logging.getLogger(__name__)

#: The service name spans carry unless OTEL_SERVICE_NAME (or the resource's
#: attributes) says otherwise.
SERVICE_NAME: Final = "tensorwire-server"
#: Calls waiting to be made spans; past this the tracer drops them (and says so once)
#: rather than let a stalled exporter grow the server's memory.
_BACKLOG: Final = 10_000


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an exporter or an OTLP endpoint named,
    and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return any(
        environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class Tracer:
    """Spans for the server's calls, exported as the ``OTEL_*`` variables say."""

    def __init__(self, device: str, environ: Mapping[str, str] = os.environ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from tensorwire_server import __version__

        resource = Resource.create({"service.name": SERVICE_NAME}).merge(
            Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
            if environ.get("OTEL_SERVICE_NAME") or environ.get("OTEL_RESOURCE_ATTRIBUTES")
            else Resource.get_empty()
        )
        # A provider of the server's own, not the process's global one: tests run
        # several servers (and the clients tracing their calls) in one process.
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(environ)))
        self.tracer = self.provider.get_tracer("tensorwire_server", __version__)
        self.device = device
        self._propagator = TraceContextTextMapPropagator()
        # perf_counter_ns (the timelines' clock) to the epoch (the spans').
        self._epoch = time.time_ns() - time.perf_counter_ns()
        self._pending: queue.SimpleQueue[tuple[Call, str, int] | None] = queue.SimpleQueue()
        self._dropped = False
        self._thread = threading.Thread(target=self._run, name="tensorwire-tracer", daemon=True)
        self._thread.start()

    def begin(self, call: Call) -> None:
        """Start ``call``'s span, as a child of the caller's trace when it sent one."""
        from opentelemetry.trace import SpanKind

        parent = None
        if call.traceparent:
            carrier = {"traceparent": call.traceparent}
            if call.tracestate:
                carrier["tracestate"] = call.tracestate
            parent = self._propagator.extract(carrier)
        service, _, method = call.method.rpartition("/")
        span = self.tracer.start_span(
            method or call.method,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=self._epoch + call.timeline.start,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service.lstrip("/"),
                "rpc.method": method,
                "tensorwire.request_id": call.request_id,
            },
        )
        if span.is_recording():  # sampled
            call.timeline.root = span
            call.timeline.device_timing = self.device.startswith("cuda")

    def finish(self, call: Call, code: str) -> None:
        """``call`` ended with status ``code``: make its spans, off the caller's path."""
        if call.timeline.root is None:
            return
        if self._pending.qsize() >= _BACKLOG:
            if not self._dropped:
                self._dropped = True
                log.warning("tracing: the exporter is behind; dropping calls' spans")
            return
        self._pending.put((call, code, time.perf_counter_ns()))

    def close(self) -> None:
        """Make the spans of the calls that ended, export them, and stop."""
        self._pending.put(None)
        self._thread.join(timeout=10)
        self.provider.shutdown()

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            try:
                self._spans(*item)
            except Exception:  # a tracing fault must not end the tracing thread
                log.exception("tracing: could not make a call's spans")

    def _spans(self, call: Call, code: str, ended: int) -> None:
        from opentelemetry.trace import Link, Status, StatusCode, set_span_in_context

        timeline = call.timeline
        root = timeline.root
        epoch = self._epoch
        context = set_span_in_context(root)
        batch = timeline.batch
        for name, start, end, attributes in timeline.spans:
            links: tuple[Link, ...] = ()
            if name == BATCH and batch is not None:
                links = tuple(
                    Link(member.root.get_span_context())
                    for member in batch.members
                    if member is not timeline and member.root is not None
                )
            if attributes is not None and EVENTS in attributes:
                # Timed on the device: from the launch, as long as the device took.
                attributes = dict(attributes)
                first, last = attributes.pop(EVENTS)
                last.synchronize()  # done long ago: the call's results came back
                end = start + int(first.elapsed_time(last) * 1e6)
                attributes["tensorwire.timing"] = "device"
            span = self.tracer.start_span(
                name, context=context, start_time=epoch + start, attributes=attributes, links=links
            )
            span.end(end_time=epoch + end)
        root.set_attributes(_attributes(call, self.device))
        root.set_attribute("rpc.grpc.status_code", _code_number(code))
        if code != "OK":
            root.set_status(Status(StatusCode.ERROR, code))
        root.end(end_time=epoch + ended)


def _attributes(call: Call, device: str) -> dict[str, Any]:
    """What a call's span says of it once it is over."""
    attributes: dict[str, Any] = {
        "tensorwire.bytes_in": call.bytes_in,
        "tensorwire.bytes_out": call.bytes_out,
        "tensorwire.device": device,
    }
    if call.target:
        attributes["tensorwire.target"] = call.target
    if call.version:
        attributes["tensorwire.model"] = call.target
        attributes["tensorwire.model_version"] = call.version
    if call.batch:
        attributes["tensorwire.batch_size"] = call.batch
    if call.caller:
        attributes["enduser.id"] = call.caller
    return attributes


def _exporter(environ: Mapping[str, str]) -> Any:
    """The span exporter ``OTEL_TRACES_EXPORTER`` names (otlp, the default, over the
    protocol ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` names; or console); the exporter
    reads its endpoint, headers and certificates from the ``OTEL_EXPORTER_OTLP_*``
    variables itself."""
    name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: tensorwire exports otlp or console")
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"OTLP protocol {protocol!r}: tensorwire exports grpc or http/protobuf")


def _code_number(code: str) -> int:
    """The number of gRPC status ``code`` (a name), as span attributes carry it."""
    try:
        return int(grpc.StatusCode[code].value[0])
    except KeyError:
        return int(grpc.StatusCode.UNKNOWN.value[0])
