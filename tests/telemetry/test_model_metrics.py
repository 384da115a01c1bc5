"""Per-model metrics: each model version's queue, compute and end-to-end time, its
payload bytes and batch sizes, and its requests in flight, scraped from a live
server's Prometheus endpoint."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tensorwire as tw
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings
from tensorwire_server.telemetry.metrics import MODEL_BUCKETS


@pytest.fixture(scope="module")
def observed() -> Iterator[tuple[str, int]]:
    settings = Settings(
        port=0, device="cpu", metrics_port=0, models={"sleeper": "support.toy_models:sleeper"}
    )
    server = TensorwireServer(settings, build_engine(settings))
    server.start()
    assert server.metrics_port
    try:
        yield f"127.0.0.1:{server.port}", server.metrics_port
    finally:
        server.stop(None)


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the endpoint, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def model_sample(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, model: str, **extra: str
) -> float:
    labels = tuple(sorted({"model": model, "version": "1", **extra}.items()))
    return found.get((name, labels), 0.0)


def test_each_model_version_has_its_queue_compute_and_latency_histograms(
    observed: tuple[str, int],
) -> None:
    address, port = observed
    before = samples(port)
    x = np.ones((3, 16), np.float32)
    with tw.Client(address, timeout=30) as client:
        for _ in range(5):
            client.infer("mlp", {"input": x})
    after = samples(port)

    def moved(name: str, **extra: str) -> float:
        return model_sample(after, name, "mlp", **extra) - model_sample(
            before, name, "mlp", **extra
        )

    for histogram in ("queue", "compute", "request"):
        assert moved(f"tensorwire_model_{histogram}_seconds_count") == 5, histogram
    # Time went somewhere: the forward passes took some, the whole calls more.
    assert moved("tensorwire_model_compute_seconds_sum") > 0
    assert moved("tensorwire_model_compute_seconds_sum") <= moved(
        "tensorwire_model_request_seconds_sum"
    )
    assert moved("tensorwire_model_payload_bytes_total", direction="in") == 5 * x.nbytes
    assert moved("tensorwire_model_payload_bytes_total", direction="out") > 0
    assert moved("tensorwire_model_batch_size_count") == 5
    assert moved("tensorwire_model_batch_size_sum") >= 5 * 3  # 3 rows each, at least
    # Buckets from 100 µs to 10 s.
    assert MODEL_BUCKETS[0] == 0.0001 and MODEL_BUCKETS[-1] == 10.0
    assert model_sample(after, "tensorwire_model_request_seconds_bucket", "mlp", le="0.0001") >= 0
    assert model_sample(
        after, "tensorwire_model_request_seconds_bucket", "mlp", le="+Inf"
    ) == model_sample(after, "tensorwire_model_request_seconds_count", "mlp")


def test_functions_and_failed_calls_stay_out_of_the_model_metrics(
    observed: tuple[str, int],
) -> None:
    address, port = observed
    with tw.Client(address, timeout=30) as client:
        client.call("add", np.ones(3), np.ones(3))
        with pytest.raises(tw.NotFoundError):
            client.infer("nobody", {"input": np.ones((1, 16), np.float32)})
    models = {labels for (name, labels) in samples(port) if name.startswith("tensorwire_model_")}
    named = {dict(labels).get("model") for labels in models}
    assert "add" not in named and "nobody" not in named and "unknown" not in named


def test_requests_in_flight_are_counted_per_model(observed: tuple[str, int]) -> None:
    address, port = observed

    def in_flight() -> float:
        return samples(port).get(("tensorwire_model_in_flight", (("model", "sleeper"),)), 0.0)

    with tw.Client(address, timeout=30) as client:
        slow = threading.Thread(target=client.infer, args=("sleeper", {"x": np.float64(1.5)}))
        slow.start()
        seen = 0.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            seen = in_flight()
            time.sleep(0.02)
        slow.join(30)
    assert seen == 1
    assert in_flight() == 0


def test_a_cpu_server_reports_no_gpu_series(observed: tuple[str, int]) -> None:
    """GPU utilisation and memory come from NVML on a GPU server; on the CPU they are
    absent, not zeros."""
    _, port = observed
    assert not [name for name, _ in samples(port) if name.startswith("tensorwire_gpu_")]


@pytest.mark.cuda
def test_a_gpu_server_reports_each_gpus_utilisation_and_memory() -> None:
    settings = Settings(port=0, device="cuda", metrics_port=0)
    server = TensorwireServer(settings, build_engine(settings))
    server.start()
    try:
        assert server.metrics_port
        found = samples(server.metrics_port)
    finally:
        server.stop(None)
    devices = {
        dict(labels)["device"] for name, labels in found if name.startswith("tensorwire_gpu_")
    }
    assert devices and all(d.startswith("cuda:") for d in devices)
    for device in devices:
        labels = (("device", device),)
        assert 0 <= found[("tensorwire_gpu_utilization_ratio", labels)] <= 1
        assert found[("tensorwire_gpu_memory_used_bytes", labels)] > 0
        assert (
            found[("tensorwire_gpu_memory_used_bytes", labels)]
            <= found[("tensorwire_gpu_memory_total_bytes", labels)]
        )
