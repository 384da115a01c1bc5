"""The tally (telemetry/tally.py): a call's record added up as plain numbers and folded
into the Prometheus children when the registry is read gives the same samples as
updating the children on every call, whole or restricted to some names."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from tensorwire_server.calls import Call
from tensorwire_server.telemetry.metrics import MODEL_BUCKETS, Metrics
from tensorwire_server.telemetry.tally import TallyRegistry

AMOUNTS = [0.0, 1e-5, 0.0001, 0.00025, 0.0003, 0.7, 1.0, 9.99, 10.0, 11.0, 1e9, 0.0001]


def _pair(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    counter = Counter("c", "a counter", ["k"], registry=registry)
    histogram = Histogram("h", "a histogram", ["k"], buckets=MODEL_BUCKETS, registry=registry)
    return counter, histogram


def _samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_fold_gives_what_updating_each_time_gives() -> None:
    plain = CollectorRegistry()
    counter, histogram = _pair(plain)
    tallied = TallyRegistry()
    t_counter, t_histogram = _pair(tallied)
    tally = tallied.tally
    for round_ in range(2):  # a second read folds only what came since the first
        for amount, key in zip(AMOUNTS, itertools.cycle("ab"), strict=False):
            counter.labels(key).inc(amount)
            histogram.labels(key).observe(amount)
            with tally.lock:
                tally.inc(t_counter.labels(key), amount)
                tally.observe(t_histogram.labels(key), amount)
        # Sums added in another order may differ in their last bit.
        assert _samples(tallied) == pytest.approx(_samples(plain), rel=1e-12), round_
    # A restricted read (the metrics endpoint's name[] query) folds too.
    with tally.lock:
        tally.observe(t_histogram.labels("a"), 0.5)
    histogram.labels("a").observe(0.5)
    names = ["h_bucket", "h_sum", "h_count"]
    restricted = _samples(tallied.restricted_registry(names))
    assert restricted == pytest.approx(_samples(plain.restricted_registry(names)), rel=1e-12)


def test_the_servers_metrics_read_as_each_call_recorded() -> None:
    metrics = Metrics(None, "none")
    for code in ("OK", "OK", "NOT_FOUND"):
        call = Call("/tensorwire.v1.TensorService/Infer", "id")
        call.target, call.version, call.batch, call.bytes_in, call.bytes_out = "m", 2, 3, 64, 8
        metrics.begin(call)
        assert metrics.registry.get_sample_value("tensorwire_in_flight") == 1
        metrics.end(call)
        metrics.finish(call, code)
    value = metrics.registry.get_sample_value
    ok = {"method": "/tensorwire.v1.TensorService/Infer", "target": "m", "code": "OK"}
    assert value("tensorwire_requests_total", ok) == 2
    assert value("tensorwire_in_flight") == 0
    assert value("tensorwire_payload_bytes_total", {"direction": "in"}) == 3 * 64
    assert value("tensorwire_batch_size_count", {"model": "m"}) == 2  # OK calls only
    model = {"model": "m", "version": "2"}
    assert value("tensorwire_model_request_seconds_count", model) == 3
    assert value("tensorwire_model_batch_size_sum", model) == 9
    assert value("tensorwire_model_payload_bytes_total", {**model, "direction": "out"}) == 24
    text = generate_latest(metrics.registry).decode()
    assert 'tensorwire_model_batch_size_bucket{le="4.0",model="m",version="2"} 3.0' in text
