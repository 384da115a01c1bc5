"""A server's life as health reports it: starting while models load, SERVING, then on
SIGTERM draining (NOT_SERVING) while in-flight requests finish, and a clean exit."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.servers import spawn_server

from tensorwire import AsyncClient, Client, DeadlineExceededError, UnavailableError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.v1 import tensorwire_pb2_grpc as pb_grpc
from tensorwire.wire.protocol import CHANNEL_OPTIONS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_goes_starting_serving_draining_and_in_flight_requests_finish() -> None:
    with spawn_server(
        "--device", "cpu", "--model", "slow=support.toy_models:slow_to_load",
        "--shutdown-grace", "20",
        env={"TENSORWIRE_TEST_LOAD_SECONDS": "2"},
        until="listening",
    ) as (proc, address, log):  # fmt: skip
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            seen: list[Any] = []
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

            def follow() -> None:
                with contextlib.suppress(grpc.RpcError):  # the server went away
                    seen.extend(r.status for r in watch)

            watcher = threading.Thread(target=follow)
            watcher.start()

            # Starting: listening, health NOT_SERVING, TensorService UNAVAILABLE.
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == NOT_SERVING
            try:
                pb_grpc.TensorServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
                raise AssertionError("TensorService answered while starting")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                assert "starting" in exc.details()  # type: ignore[attr-defined]

            deadline = time.monotonic() + 60
            while SERVING not in seen and time.monotonic() < deadline:
                time.sleep(0.05)
            assert SERVING in seen, seen

            # Draining: a 2 s request in flight when SIGTERM comes finishes, health
            # turns NOT_SERVING, new requests are refused, and the process exits 0.
            result: dict[str, Any] = {}

            def slow_call() -> None:
                with Client(address, timeout=30) as c:
                    result["y"] = c.infer("slow", np.float64(2.0))["output"]

            caller = threading.Thread(target=slow_call)
            caller.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            caller.join(30)
            assert float(result["y"]) == 2.0
            assert proc.wait(30) == 0
            watcher.join(10)
        assert seen[0] == NOT_SERVING and seen[-1] == NOT_SERVING
        assert seen.index(SERVING) < len(seen) - 1, seen
        deadline = time.monotonic() + 10  # the log's last lines still arriving
        while "server stopped" not in "".join(log) and time.monotonic() < deadline:
            time.sleep(0.05)
        text = "".join(log)
        for state in ("server serving", "server draining", "server stopped"):
            assert state in text, text


def test_reflection_lists_and_describes_every_service(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="tensorwire.v1.TensorService"
            ),
        ]
        listed, described = stub.ServerReflectionInfo(iter(requests), timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "tensorwire.v1.TensorService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert described.file_descriptor_response.file_descriptor_proto


def test_a_starting_server_is_waited_for_within_the_deadline() -> None:
    """While its models load a server answers UNAVAILABLE with gRPC's server pushback;
    the clients wait and ask again until it serves, within each call's deadline, even
    for calls that are never sent twice otherwise (it ran none of them)."""
    with spawn_server(
        "--device", "cpu", "--model", "slow=support.toy_models:slow_to_load",
        env={"TENSORWIRE_TEST_LOAD_SECONDS": "3"},
        until="listening",
    ) as (_, address, _):  # fmt: skip
        began = time.monotonic()
        with (
            Client(address, timeout=0.5, retries=0) as c,
            pytest.raises((UnavailableError, DeadlineExceededError), match="starting") as short,
        ):
            c.info()
        assert "cannot reach" not in str(short.value)  # it was reached: not serving yet

        # A longer deadline is enough: each call waits for the models (3 s here), far
        # past what the retries alone would (and retries=0 allows none). Put is never
        # sent twice otherwise: the server ran none of the attempts it pushed back.
        def put_and_get() -> list[float]:
            with Client(address, timeout=30, retries=0) as c:
                return c.put(np.arange(4.0)).numpy().tolist()  # type: ignore[no-any-return]

        async def info_async() -> set[str]:
            async with AsyncClient(address, timeout=30, retries=0) as ac:
                return set((await ac.info()).models)

        with futures.ThreadPoolExecutor(1) as pool:
            put = pool.submit(put_and_get)
            assert "slow" in asyncio.run(info_async())
            assert put.result(60) == [0, 1, 2, 3]
        assert time.monotonic() - began >= 2
