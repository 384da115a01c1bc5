"""Tracing's price, measured: the same server with tracing off and on (every call
sampled, spans exported over OTLP/gRPC to a receiver that drops them), in one run.

    .venv/bin/python benchmarks/tracing.py [--calls 2000] [--size 256M] [--repeats 3]
        [--json results.json]

1. Sequential small calls (a [1, 16] float32 identity), p50 and p99, the servers sampled
   in turn so that drift on a shared machine hits all alike: tracing off; tracing on
   (the server samples every call, as roots); tracing on with a traced caller (the
   client's span active, so the call carries traceparent).
2. A ``--size`` identity round trip (best of ``--repeats``) on each server.

Targets (issue 31): with sampling 1.0, small-call p50 <= 1.15 x tracing off and the
large round trip's throughput >= 0.97 x. (Tracing off against the build without the
feature is a before/after run of control_plane.py and run.py on the two trees.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent import futures
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from batching import start_server
from control_plane import quantiles, start
from measuring import best_of, human, make_payload, parse_size

import tensorwire as tw

SMALL = np.ones((1, 16), np.float32)


def otlp_sink(port_out: Connection) -> None:
    """In its own process: an OTLP/gRPC trace receiver that drops what it gets."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_out.send(port)
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from opentelemetry.sdk.trace import TracerProvider

    sink, sink_port = start(otlp_sink)
    traced_env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    off, off_address = start_server("cpu", batching=True)
    on, on_address = start_server("cpu", batching=True, env=traced_env)
    caller = TracerProvider().get_tracer("benchmark")  # spans made, never exported
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    try:
        with (
            tw.Client(off_address, timeout=120) as plain,
            tw.Client(on_address, timeout=120) as traced,
        ):

            def traced_caller() -> None:
                with caller.start_as_current_span("call"):
                    traced.infer("identity", SMALL)

            parties = {
                "tracing off": lambda: plain.infer("identity", SMALL),
                "tracing on": lambda: traced.infer("identity", SMALL),
                "tracing on, traced caller": traced_caller,
            }
            for _ in range(200):
                for fn in parties.values():
                    fn()
            samples: dict[str, list[float]] = {name: [] for name in parties}
            for _ in range(args.calls):
                for name, fn in parties.items():
                    began = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - began)
            results["small_call"] = {name: quantiles(s) for name, s in samples.items()}
            size = parse_size(args.size)
            payload = make_payload(size)
            results["large_round_trip_gb_s"] = {}
            for name, client in (("tracing off", plain), ("tracing on", traced)):
                seconds = best_of(args.repeats, lambda c=client: c.infer("identity", payload))
                results["large_round_trip_gb_s"][name] = 2 * size / seconds / 1e9
    finally:
        for proc in (off, on):
            proc.terminate()
            proc.wait(30)
        sink.terminate()
    small = results["small_call"]
    large = results["large_round_trip_gb_s"]
    ratio_small = small["tracing on"]["p50_us"] / small["tracing off"]["p50_us"]
    ratio_large = large["tracing on"] / large["tracing off"]
    results["targets"] = {
        "small p50 on/off <= 1.15": ratio_small,
        "large throughput on/off >= 0.97": ratio_large,
    }
    print(f"machine: {results['machine']}")
    print("small call         p50 µs    p99 µs")
    for name, q in small.items():
        print(f"  {name:27s} {q['p50_us']:8.1f} {q['p99_us']:9.1f}")
    print(f"{human(size)} round trip, GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in large.items()))
    print(f"small p50 on/off: {ratio_small:.3f} (target <= 1.15)")
    print(f"large throughput on/off: {ratio_large:.3f} (target >= 0.97)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    main()
