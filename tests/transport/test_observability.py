"""Metrics move as requests arrive; every response carries a request id that the
server's access log (JSON on request) names too."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.servers import spawn_server

from tensorwire import AsyncClient, Client, NotFoundError, UnavailableError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.v1 import tensorwire_pb2_grpc as pb_grpc
from tensorwire.wire.protocol import CHANNEL_OPTIONS
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

INFER = "/tensorwire.v1.TensorService/Infer"


@pytest.fixture(scope="module")
def observed() -> Iterator[tuple[str, int]]:
    settings = Settings(port=0, device="cpu", metrics_port=0)
    server = TensorwireServer(settings, build_engine(settings))
    server.start()
    assert server.metrics_port
    try:
        yield f"127.0.0.1:{server.port}", server.metrics_port
    finally:
        server.stop(None)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def requests(samples: dict[str, float], target: str, code: str) -> float:
    key = f'tensorwire_requests_total{{code="{code}",method="{INFER}",target="{target}"}}'
    return samples.get(key, 0.0)


def test_counters_latency_and_bytes_move_with_requests(observed: tuple[str, int]) -> None:
    address, port = observed
    before = scrape(port)
    x = np.arange(1000, dtype=np.float32)
    with Client(address) as c:
        for _ in range(3):
            c.infer("identity", x)
        for name in ("no-such-model", "another-invented-name"):
            with pytest.raises(NotFoundError):
                c.infer(name, x)
    after = scrape(port)
    assert requests(after, "identity", "OK") - requests(before, "identity", "OK") == 3
    # Invented names share one label: clients cannot grow the metrics without bound.
    assert requests(after, "unknown", "NOT_FOUND") - requests(before, "unknown", "NOT_FOUND") == 2
    assert not any("no-such-model" in key for key in after)
    moved_in = after['tensorwire_payload_bytes_total{direction="in"}'] - before.get(
        'tensorwire_payload_bytes_total{direction="in"}', 0
    )
    moved_out = after['tensorwire_payload_bytes_total{direction="out"}'] - before.get(
        'tensorwire_payload_bytes_total{direction="out"}', 0
    )
    assert moved_in == 5 * x.nbytes and moved_out == 3 * x.nbytes
    count = f'tensorwire_request_seconds_count{{method="{INFER}"}}'
    assert after[count] - before.get(count, 0) == 5
    batches = 'tensorwire_batch_size_count{model="identity"}'
    assert after[batches] - before.get(batches, 0) == 3
    assert after["tensorwire_in_flight"] == 0
    assert after["tensorwire_queue_depth"] == 0
    assert after["tensorwire_device_memory_bytes"] > 0
    assert after["tensorwire_device_memory_peak_bytes"] >= after["tensorwire_device_memory_bytes"]


def test_every_response_carries_a_request_id(observed: tuple[str, int]) -> None:
    address, _ = observed
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.TensorServiceStub(channel)
        _, call = stub.Info.with_call(pb.InfoRequest(), timeout=10)
        first = dict(call.trailing_metadata())["x-request-id"]
        _, call = stub.Info.with_call(pb.InfoRequest(), timeout=10)
        assert re.fullmatch(r"[0-9a-f]{32}", first)
        assert dict(call.trailing_metadata())["x-request-id"] != first
        # A client's own id is kept, when it is a sane token, so both logs agree.
        _, call = stub.Info.with_call(
            pb.InfoRequest(), timeout=10, metadata=[("x-request-id", "job-42.step:7")]
        )
        assert dict(call.trailing_metadata())["x-request-id"] == "job-42.step:7"
        with pytest.raises(grpc.RpcError) as failed:
            stub.Infer(pb.InferRequest(model="nope"), timeout=10)
        assert "x-request-id" in dict(failed.value.trailing_metadata())  # type: ignore[attr-defined]
        _, call = stub.Info.with_call(
            pb.InfoRequest(), timeout=10, metadata=[("x-request-id", "bad id " * 20)]
        )
        assert re.fullmatch(r"[0-9a-f]{32}", dict(call.trailing_metadata())["x-request-id"])
        # A streaming response has it in its initial metadata too, before the end.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=10, metadata=[("x-request-id", "watch-1")]
        )
        assert dict(watch.initial_metadata())["x-request-id"] == "watch-1"
        watch.cancel()


@pytest.mark.parametrize("access", ["errors", "all"])
def test_json_logs_name_each_request_by_its_id(access: str) -> None:
    flags = ("--device", "cpu", "--log-format", "json", "--access-log", access)
    with spawn_server(*flags) as (proc, address, lines):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.TensorServiceStub(channel)
            _, ok = stub.Info.with_call(pb.InfoRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Infer(pb.InferRequest(model="nope"), timeout=10)
        request_id = dict(failed.value.trailing_metadata())["x-request-id"]  # type: ignore[attr-defined]
        proc.terminate()
        proc.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "server stopped" not in "".join(lines):
            time.sleep(0.05)  # the last lines are still on their way from the pipe
    records = [json.loads(line) for line in lines if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    (record,) = [r for r in records if r.get("request_id") == request_id]
    assert record["logger"] == "tensorwire_server.access"
    assert record["method"] == INFER and record["code"] == "NOT_FOUND"
    assert record["target"] == "unknown" and record["seconds"] >= 0
    # A success writes a record only when asked to: the metrics count it either way.
    ok_id = dict(ok.trailing_metadata())["x-request-id"]
    logged = [r for r in records if r.get("request_id") == ok_id]
    assert [r["code"] for r in logged] == (["OK"] if access == "all" else [])


def test_client_errors_carry_the_request_id_the_log_names() -> None:
    flags = ("--device", "cpu", "--log-format", "json")
    x = np.arange(10, dtype=np.float32)
    with spawn_server(*flags) as (proc, address, lines):
        with Client(address, timeout=10) as c, pytest.raises(NotFoundError) as unary:
            c.infer("nope", x)
        # Streamed both ways: the id comes back on a stream's error too.
        with (
            Client(address, timeout=10, stream_threshold=0) as c,
            pytest.raises(NotFoundError) as streamed,
        ):
            c.infer("nope-either", x)

        async def failing() -> str | None:
            async with AsyncClient(address, timeout=10) as ac:
                try:
                    await ac.infer("nor-this", x)
                except NotFoundError as exc:
                    return exc.request_id
            return None

        async_id = asyncio.run(failing())
        proc.terminate()
        proc.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "server stopped" not in "".join(lines):
            time.sleep(0.05)
    ids = [unary.value.request_id, streamed.value.request_id, async_id]
    assert all(i is not None and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert f"(request id {ids[0]})" in str(unary.value)
    records = [json.loads(line) for line in lines if line.strip()]
    logged = {r["request_id"]: r for r in records if r.get("code") == "NOT_FOUND"}
    assert all(i in logged for i in ids), (ids, sorted(logged))
    # No server answered: no id to give.
    with Client("127.0.0.1:1", timeout=1, retries=0) as c, pytest.raises(UnavailableError) as lost:
        c.info()
    assert lost.value.request_id is None
