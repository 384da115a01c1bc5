"""Faults a server must survive, or report: out-of-memory in one request, then normal
service; a device that fails for good, reported NOT_SERVING for a restart."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.servers import spawn_server

from tensorwire import Client, InternalError, ResourceExhaustedError
from tensorwire_server.settings import Settings


def _vm_size(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def test_out_of_memory_is_resource_exhausted_and_the_next_request_is_served() -> None:
    with spawn_server("--device", "cpu") as (proc, address, _):
        with Client(address, timeout=60) as c:  # warm up every path the test uses
            c.call("kron", np.ones((4, 1), np.float32), np.ones((1, 4), np.float32))
        # The server's memory cap: 1 GiB of address space more than it uses now.
        cap = _vm_size(proc.pid) + (1 << 30)
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        with Client(address, timeout=60) as c:
            for _ in range(3):  # and again: nothing leaks from a failed allocation
                with pytest.raises(ResourceExhaustedError, match=r"ran out of cpu memory") as exc:
                    # A 4 GiB result.
                    c.call(
                        "kron", np.ones((1 << 15, 1), np.float32), np.ones((1, 1 << 15), np.float32)
                    )
                assert re.search(r"\d+ bytes", str(exc.value)), exc.value
                x = np.arange(1000, dtype=np.float64)
                assert np.array_equal(c.infer("identity", x)["output"], x)
        assert proc.poll() is None


def test_a_failed_device_turns_the_server_not_serving() -> None:
    settings = Settings(
        port=0, device="cpu", models={"poison": "support.toy_models:device_failure"}
    )
    for address in start(settings):
        with Client(address, timeout=10, retries=0) as c:
            assert c.infer("identity", np.ones(2))["output"].tolist() == [1, 1]
            # INTERNAL, not UNAVAILABLE: no retry can succeed here, and the request
            # that broke this device must not be sent on to break another.
            with pytest.raises(InternalError, match="must be restarted"):
                c.infer("poison", np.ones(2))
            # Every later request is refused: the device is gone, not the request.
            with pytest.raises(InternalError, match="device failed"):
                c.infer("identity", np.ones(2))
        with grpc.insecure_channel(address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
