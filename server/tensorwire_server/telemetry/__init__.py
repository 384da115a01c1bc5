"""What the server tells its operators: ``metrics`` (Prometheus: calls, latency, bytes,
per-model queue and compute time, batches, devices) with ``metrics_endpoint`` (its
HTTP listener), ``access_log`` (the access log and JSON log lines), ``tracing``
(OpenTelemetry spans made from each call's timeline, where tracing is on) and
``devices`` (GPU utilisation and memory, from NVML where it is present).

May import: the package root's shared modules (each call's record, its timeline, the
settings); nothing of the other packages: the transport feeds it each finished call.
"""
