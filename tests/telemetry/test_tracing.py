"""Traces end to end, checked by a real OTLP receiver: a client that traces its calls
sends W3C trace context, the server (its own process, configured by the standard
``OTEL_*`` variables) continues the trace with a span per call and one per phase,
links the requests of one batch to each other, records failed calls as errors and
follows the caller's sampling decision."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Tracer
from support.otlp import Receiver, Span, otlp_receiver, tracing_env
from support.servers import spawn_server

import tensorwire as tw
from tensorwire_server.telemetry import tracing

SERVER = "tensorwire-server"
CLIENT = "test-client"


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Receiver, str, str]]:
    """A receiver, a traced server sending it spans, and the receiver's endpoint."""
    with (
        otlp_receiver() as (receiver, endpoint),
        spawn_server("--device", "cpu", env=tracing_env(endpoint)) as (_, address, _),
    ):
        yield receiver, address, endpoint


def client_tracer(endpoint: str, **options: object) -> tuple[TracerProvider, Tracer]:
    provider = TracerProvider(resource=Resource.create({"service.name": CLIENT}), **options)  # type: ignore[arg-type]
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
    )
    return provider, provider.get_tracer("tests")


def spans_of(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def server_root(spans: list[Span], trace_id: str) -> Span | None:
    return next((s for s in spans_of(spans, trace_id) if s.service == SERVER and s.kind == 2), None)


def test_a_traced_call_is_one_trace_from_the_caller_through_each_phase(
    traced: tuple[Receiver, str, str],
) -> None:
    receiver, address, endpoint = traced
    provider, tracer = client_tracer(endpoint)
    x = np.ones((2, 16), np.float32)
    with tw.Client(address, timeout=30) as client:
        with tracer.start_as_current_span("caller") as caller:
            client.infer("mlp", {"input": x})
        trace_id = f"{caller.get_span_context().trace_id:032x}"
        caller_id = f"{caller.get_span_context().span_id:016x}"
    provider.shutdown()

    def complete(spans: list[Span]) -> bool:
        root = server_root(spans, trace_id)
        return root is not None and {"gate", "forward"} <= {
            s.name for s in spans_of(spans, trace_id) if s.parent == root.span_id
        }

    spans = receiver.wait_for(complete)
    root = server_root(spans, trace_id)
    assert root is not None, spans_of(spans, trace_id)
    # The server's span is the caller's child, in the caller's trace.
    assert root.parent == caller_id
    assert root.name == "Infer"
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["tensorwire.model"] == "mlp"
    assert root.attributes["tensorwire.model_version"] >= 1
    assert root.attributes["tensorwire.bytes_in"] == x.nbytes
    assert root.attributes["tensorwire.device"] == "cpu"
    assert root.attributes["tensorwire.request_id"]
    assert root.attributes["rpc.grpc.status_code"] == 0
    assert root.status != 2
    phases = [s for s in spans_of(spans, trace_id) if s.parent == root.span_id]
    names = {s.name for s in phases}
    assert {"gate", "batch", "host_to_device", "forward", "device_to_host", "encode"} <= names, (
        names
    )
    for phase in phases:  # each phase within the call
        assert root.start <= phase.start <= phase.end <= root.end, phase
    # One trace: the caller's span, the server's, and the server's phases, nothing else.
    assert {s.span_id for s in spans_of(spans, trace_id)} == {caller_id, root.span_id} | {
        s.span_id for s in phases
    }


def test_a_failed_call_is_recorded_as_an_error(traced: tuple[Receiver, str, str]) -> None:
    receiver, address, endpoint = traced
    provider, tracer = client_tracer(endpoint)
    x = np.ones((1, 16), np.float32)
    with (
        tw.Client(address, timeout=30) as client,
        tracer.start_as_current_span("caller") as caller,
        pytest.raises(tw.NotFoundError),
    ):
        client.infer("no-such-model", {"input": x})
    provider.shutdown()
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    spans = receiver.wait_for(lambda spans: server_root(spans, trace_id) is not None)
    root = server_root(spans, trace_id)
    assert root is not None
    assert root.status == 2  # ERROR
    assert root.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND


def test_the_requests_of_one_batch_link_to_each_other(traced: tuple[Receiver, str, str]) -> None:
    receiver, address, endpoint = traced
    provider, tracer = client_tracer(endpoint)
    x = np.ones((1, 16), np.float32)
    with tw.Client(address, timeout=30) as client:

        def one(i: int) -> str:
            with tracer.start_as_current_span(f"caller-{i}") as span:
                client.infer("mlp", {"input": x})
            return f"{span.get_span_context().trace_id:032x}"

        # The MLP batches what waits while it runs: 32 callers at once make batches,
        # though which calls share one is the scheduler's choice; try a few times.
        for _ in range(5):
            with futures.ThreadPoolExecutor(32) as pool:
                traces = set(pool.map(one, range(32)))

            def shared(spans: list[Span], traces: set[str] = traces) -> list[Span]:
                return [
                    s
                    for s in spans
                    if s.name == "batch"
                    and s.trace_id in traces
                    and s.attributes.get("tensorwire.batch_requests", 1) > 1
                ]

            def linked(spans: list[Span], traces: set[str] = traces) -> bool:
                """Batches formed, and every request they link to has arrived."""
                roots = {s.span_id for s in spans if s.service == SERVER and s.kind == 2}
                batches = shared(spans, traces)
                return bool(batches) and all(
                    span_id in roots for b in batches for _, span_id in b.links
                )

            spans = receiver.wait_for(linked, seconds=10)
            if shared(spans):
                break
    provider.shutdown()
    batches = shared(spans)
    assert batches, "no batch of two or more requests formed in five tries"
    roots = {s.span_id: s for s in spans if s.service == SERVER and s.kind == 2}
    for batch in batches:
        # Linked to every other request of its batch: each link is another call's span.
        assert len(batch.links) == batch.attributes["tensorwire.batch_requests"] - 1
        for trace_id, span_id in batch.links:
            assert trace_id != batch.trace_id
            linked = roots.get(span_id)
            assert linked is not None and linked.trace_id == trace_id
            assert (
                linked.attributes.get("tensorwire.batch_size")
                == batch.attributes["tensorwire.batch_size"]
            )


def test_a_caller_that_samples_a_trace_out_gets_no_server_spans(
    traced: tuple[Receiver, str, str],
) -> None:
    receiver, address, endpoint = traced
    provider, tracer = client_tracer(endpoint, sampler=ALWAYS_OFF)
    sampled, _ = client_tracer(endpoint)
    with tw.Client(address, timeout=30) as client:
        with tracer.start_as_current_span("unsampled") as quiet:
            client.infer("mlp", {"input": np.ones((1, 16), np.float32)})
        # A sampled call after it, to know when the server's spans have arrived.
        with sampled.get_tracer("tests").start_as_current_span("sampled") as loud:
            client.infer("mlp", {"input": np.ones((1, 16), np.float32)})
    quiet_id = f"{quiet.get_span_context().trace_id:032x}"
    loud_id = f"{loud.get_span_context().trace_id:032x}"
    spans = receiver.wait_for(lambda spans: server_root(spans, loud_id) is not None)
    assert server_root(spans, loud_id) is not None
    assert spans_of(spans, quiet_id) == []
    provider.shutdown()
    sampled.shutdown()


def test_tracing_is_off_unless_the_standard_variables_ask_for_it() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})


def test_a_client_that_does_not_trace_never_imports_opentelemetry(
    traced: tuple[Receiver, str, str],
) -> None:
    """The client's tracing costs nothing when the caller does not trace: it neither
    imports OpenTelemetry nor needs it installed."""
    _, address, _ = traced
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # as if not installed
        "import numpy as np, tensorwire as tw\n"
        f"with tw.Client({address!r}, timeout=30) as c:\n"
        "    c.infer('mlp', {'input': np.ones((1, 16), np.float32)})\n"
        "assert sys.modules['opentelemetry'] is None\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_bulk_call_traces_its_transfers(traced: tuple[Receiver, str, str]) -> None:
    """A large payload's trip beside gRPC (the data port, or shared memory on the same
    host) is a span of its call, each way."""
    receiver, address, endpoint = traced
    provider, tracer = client_tracer(endpoint)
    x = np.ones(2 << 20, np.float32)  # 8 MiB: past the client's stream threshold
    with tw.Client(address, timeout=60) as client, tracer.start_as_current_span("bulk") as span:
        client.infer("identity", {"input": x})
    provider.shutdown()
    trace_id = f"{span.get_span_context().trace_id:032x}"

    def transfers(spans: list[Span]) -> list[Span]:
        return [s for s in spans_of(spans, trace_id) if s.name == "transfer"]

    spans = receiver.wait_for(lambda spans: len(transfers(spans)) >= 2)
    found = {
        (s.attributes["tensorwire.direction"], s.attributes["tensorwire.bytes"])
        for s in transfers(spans)
    }
    assert found == {("in", x.nbytes), ("out", x.nbytes)}
    assert {s.attributes["tensorwire.path"] for s in transfers(spans)} <= {"tcp", "shared_memory"}


def test_a_gradient_call_traces_its_backward_pass(traced: tuple[Receiver, str, str]) -> None:
    receiver, address, endpoint = traced
    provider, tracer = client_tracer(endpoint)
    with tw.Client(address, timeout=30) as client, tracer.start_as_current_span("grad") as span:
        x = np.ones((2, 16), np.float32)
        client.grad("mlp", {"input": x}, grad_outputs=np.ones((2, 4), np.float32))
    provider.shutdown()
    trace_id = f"{span.get_span_context().trace_id:032x}"

    def names(spans: list[Span]) -> set[str]:
        return {s.name for s in spans_of(spans, trace_id)}

    spans = receiver.wait_for(lambda spans: "backward" in names(spans))
    assert {"Grad", "forward", "backward"} <= names(spans)
    (forward,) = [s for s in spans_of(spans, trace_id) if s.name == "forward"]
    (backward,) = [s for s in spans_of(spans, trace_id) if s.name == "backward"]
    assert forward.end <= backward.start


@pytest.mark.cuda
def test_on_cuda_compute_and_copies_are_timed_on_the_device() -> None:
    with (
        otlp_receiver() as (receiver, endpoint),
        spawn_server("--device", "cuda", env=tracing_env(endpoint)) as (_, address, _),
    ):
        with tw.Client(address, timeout=60) as client:
            client.infer("mlp", {"input": np.ones((64, 16), np.float32)})
        spans = receiver.wait_for(lambda spans: any(s.name == "forward" for s in spans), seconds=30)
    timed = {s.name: s.attributes.get("tensorwire.timing") for s in spans if s.service == SERVER}
    assert timed.get("forward") == "device"
    assert timed.get("host_to_device") == "device"


def test_a_malformed_or_huge_trace_context_starts_a_trace_of_its_own(
    traced: tuple[Receiver, str, str],
) -> None:
    """A caller's trace context is only ever parsed by the W3C propagator: garbage (or
    as much of it as gRPC's metadata limit lets through) gives the call a new trace,
    and the server answers as ever."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    receiver, address, _ = traced
    before = {s.span_id for s in receiver.spans}
    metadata = (("traceparent", "00-" + "z" * 6000), ("tracestate", "k=" + "v" * 1000))
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    def fresh(spans: list[Span]) -> list[Span]:
        return [s for s in spans if s.name == "Check" and s.span_id not in before]

    spans = receiver.wait_for(lambda spans: bool(fresh(spans)))
    check = fresh(spans)[0]
    assert check.parent == "" and check.status != 2
