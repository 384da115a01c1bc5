"""The fast lane (issue 33) on both ends: small calls as frames on a data-port
connection, through the same gate as gRPC (scopes, statuses, request ids, deadlines),
with its semantics kept (concurrency, cancellation, sessions, retries) and its
fallbacks (a server without it, fast_lane=False, the environment)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TOY_MODELS, engine_server, on_device
from conftest import server_address as address
from support.servers import spawn_server

import tensorwire as tw
from tensorwire._transport import lane as client_lane
from tensorwire._transport import lane_aio, lane_pool
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

TIMEOUT = 20
SMALL = np.arange(16, dtype=np.float32).reshape(1, 16)
TOKENS = (
    "alice * alice-token-0123456789abcdef;"
    "reader call reader-token-0123456789abcdef"  # may Call, may not Infer
)


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(on_device(Settings(device="cpu", models=TOY_MODELS)))


served = contextlib.contextmanager(engine_server)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[TensorwireServer]:  # type: ignore[no-untyped-def]
    with served(engine) as running:
        yield running


def on_lane(server: TensorwireServer) -> int:
    assert server.lane is not None
    return server.lane.answered


def lane_of(client: tw.Client | tw.AsyncClient, method: str = "Infer") -> client_lane.Lane:
    found = client._transport._methods[method]
    assert hasattr(found, "lane"), f"{method} is not on the lane"
    return found.lane  # type: ignore[no-any-return]


def test_small_calls_take_the_lane_and_answer_as_grpc(server: TensorwireServer) -> None:
    before = on_lane(server)
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        out = client.infer("identity", SMALL)["output"]
        np.testing.assert_array_equal(out, SMALL)
        out[0, 0] = -1  # the caller's own, writable array
        assert client.call("add", SMALL, SMALL) is not None
        x = np.arange(5, dtype=np.float64)
        over_lane = client.grad("quadratic", {"x": x}, wrt=["x"])
        with tw.Client(address(server), timeout=TIMEOUT, fast_lane=False) as grpc_only:
            over_grpc = grpc_only.grad("quadratic", {"x": x}, wrt=["x"])
        np.testing.assert_array_equal(over_lane.grads["x"], over_grpc.grads["x"])
        assert client.info().models
    assert on_lane(server) - before >= 4


def test_errors_are_grpcs_statuses_and_messages(server: TensorwireServer) -> None:
    with (
        tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as fast,
        tw.Client(address(server), timeout=TIMEOUT, fast_lane=False) as slow,
    ):
        errors = []
        for client in (fast, slow):
            with pytest.raises(tw.NotFoundError) as caught:
                client.infer("no-such-model", SMALL)
            errors.append(caught.value)
            with pytest.raises(tw.InvalidArgumentError) as bad:
                client.infer("identity", {"nope": SMALL})
            errors.append(bad.value)
        assert str(errors[0]).split(" (request id")[0] == str(errors[2]).split(" (request id")[0]
        assert str(errors[1]).split(" (request id")[0] == str(errors[3]).split(" (request id")[0]
        assert all(e.request_id for e in errors)  # the server's id, over both


def test_scopes_hold_on_the_lane(engine) -> None:  # type: ignore[no-untyped-def]
    with served(engine, tokens=TOKENS) as server:
        target = address(server)
        with tw.Client(
            target, timeout=TIMEOUT, fast_lane=True, token="reader-token-0123456789abcdef"
        ) as reader:
            before = on_lane(server)
            np.testing.assert_array_equal(reader.call("add", SMALL, SMALL), 2 * SMALL)
            with pytest.raises(tw.PermissionDeniedError, match="lacks the 'infer' scope"):
                reader.infer("identity", SMALL)
            assert on_lane(server) - before == 2  # both answered on the lane
        with tw.Client(
            target, timeout=TIMEOUT, fast_lane=True, token="alice-token-0123456789abcdef"
        ) as alice:
            np.testing.assert_array_equal(alice.infer("identity", SMALL)["output"], SMALL)
        wrong = "wrong-token-0123456789abcdef"
        with (
            tw.Client(target, timeout=TIMEOUT, fast_lane=True, token=wrong) as nobody,
            pytest.raises(tw.UnauthenticatedError),
        ):
            nobody.infer("identity", SMALL)  # no grant: gRPC says why


def test_deadline_and_cancellation_end_the_call_on_the_server(server: TensorwireServer) -> None:
    slow = np.array(1.0)
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        client.infer("identity", SMALL)  # the lane is open
        began = time.monotonic()
        with pytest.raises(tw.DeadlineExceededError):
            client.infer("sleeper", slow, timeout=0.2)
        assert time.monotonic() - began < 0.9  # the caller's deadline, not the model's
        assert len(lane_of(client).idle) == 0  # the cut connection is not reused
        with pytest.raises(tw.DeadlineExceededError):
            client.infer("identity", SMALL, timeout=0)  # no time left: as gRPC answers
        np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)

    async def cancelled() -> None:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, fast_lane=True) as client:
            await client.infer("identity", SMALL)
            task = asyncio.ensure_future(client.infer("sleeper", slow))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.infer("identity", SMALL))["output"].shape == (1, 16)

    asyncio.run(cancelled())
    # Every place the calls held is given back once the sleeps end.
    deadline = time.monotonic() + 10
    while server.gate.admission.held("calls") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.gate.admission.held("calls") == 0


def test_many_threads_and_tasks_each_get_their_own_answer(server: TensorwireServer) -> None:
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        failures: list[BaseException] = []

        def caller(k: int) -> None:
            try:
                for i in range(30):
                    x = np.full((1, 16), k * 1000 + i, np.float32)
                    np.testing.assert_array_equal(client.infer("identity", x)["output"], x)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        assert len(lane_of(client).idle) <= lane_pool.POOLED

    async def tasks() -> None:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, fast_lane=True) as client:
            xs = [np.full((1, 16), k, np.float32) for k in range(32)]
            outs = await asyncio.gather(*(client.infer("identity", x) for x in xs))
            for x, out in zip(xs, outs, strict=True):
                np.testing.assert_array_equal(out["output"], x)

    asyncio.run(tasks())


def test_a_batched_models_calls_wait_for_their_batch_and_each_gets_its_rows(
    engine, server: TensorwireServer
) -> None:  # type: ignore[no-untyped-def]
    # A lane call runs its first step as its frame is parsed (connection._start); a
    # batched model's call waits there for its batch and goes on as a task.
    xs = [np.full((1 + k % 3, 16), k / 10, np.float32) for k in range(16)]
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=False) as grpc_client:
        expected = [grpc_client.infer("mlp", x)["output"] for x in xs]
    before = on_lane(server)
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        failures: list[BaseException] = []

        def caller(k: int) -> None:
            try:
                for _ in range(5):
                    got = client.infer("mlp", xs[k])["output"]
                    np.testing.assert_allclose(got, expected[k], rtol=1e-5, atol=1e-6)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
    assert on_lane(server) >= before + 5 * len(xs)
    assert engine.registry.batched("mlp")


def test_sessions_and_remote_tensors_on_the_lane(server: TensorwireServer) -> None:
    before = on_lane(server)
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        handle = client.put(SMALL)
        kept = client.call("add", handle, handle, keep=True)
        np.testing.assert_array_equal(kept.numpy(), 2 * SMALL)
        kept.free()
    assert on_lane(server) - before >= 4  # OpenSession, Put, Call, Get, Free, ...


def test_a_lane_that_breaks_mid_call_fails_that_call_as_grpc_would(engine) -> None:  # type: ignore[no-untyped-def]
    with (
        served(engine) as server,
        tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client,
    ):
        client.infer("identity", SMALL)

        def cut() -> None:
            time.sleep(0.3)
            assert server.lane is not None
            server._loop.call_soon_threadsafe(server.lane.close)

        threading.Thread(target=cut).start()
        # Idempotent: retried (gRPC now: the lane is closed) and answered.
        out = client.infer("sleeper", np.array(0.8))["output"]
        assert float(out) == 0.8
        np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)


def test_fallback_to_grpc_where_there_is_no_lane(engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with served(engine, fast_lane=False) as server:
        assert server.lane is None
        with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
            for _ in range(3):
                np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
            assert lane_of(client).detours.avoided() == [None]  # remembered: no more asks
    with served(engine) as server:
        with tw.Client(address(server), timeout=TIMEOUT, fast_lane=False) as client:
            assert not hasattr(client._transport._methods["Infer"], "lane")
            client.infer("identity", SMALL)
        monkeypatch.setenv(lane_pool.ENV, "0")
        with tw.Client(address(server), timeout=TIMEOUT) as client:
            assert not hasattr(client._transport._methods["Infer"], "lane")
        with tw.Client(
            address(server), timeout=TIMEOUT, fast_lane=True, data_plane=False
        ) as client:
            assert not hasattr(client._transport._methods["Infer"], "lane")
        assert on_lane(server) == 0


def test_large_requests_and_responses_keep_their_paths(server: TensorwireServer) -> None:
    big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: streamed, over the data port
    mid = np.arange(16 << 10, dtype=np.float32)  # 64 KiB: on the lane
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        before = on_lane(server)
        np.testing.assert_array_equal(client.infer("identity", mid)["output"], mid)
        assert on_lane(server) == before + 1
        np.testing.assert_array_equal(client.infer("identity", big)["output"], big)
        assert on_lane(server) == before + 1


def test_keepalive_notices_a_stopped_server_on_the_lane_as_grpc_does() -> None:
    quick = [("grpc.keepalive_time_ms", 500), ("grpc.keepalive_timeout_ms", 1000)]
    flags = ("--device", "cpu", "--model", "sleeper=support.toy_models:sleeper")

    async def long_call(target: str, proc: subprocess.Popen[str]) -> float:
        async with tw.AsyncClient(
            target, timeout=30, retries=0, options=quick, fast_lane=True
        ) as client:
            await client.infer("identity", SMALL)  # on the lane
            assert isinstance(client._transport._methods["Infer"], lane_aio.AsyncLaneMethod)
            call = asyncio.ensure_future(client.infer("sleeper", np.array(25.0)))
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
            stopped = time.monotonic()
            with pytest.raises(tw.UnavailableError, match="keepalive"):
                await call
            return time.monotonic() - stopped

    # The server's lane on, even in a run with the clients' lane off (--fast-lane off
    # sets the variable both read): this test is the lane's own.
    with spawn_server(*flags, env={"TENSORWIRE_FAST_LANE": "1"}) as (proc, target, _):
        try:
            assert asyncio.run(long_call(target, proc)) < 6
        finally:
            proc.send_signal(signal.SIGCONT)


def test_one_deadline_for_grant_and_call_and_an_overloaded_grant_detours(
    server: TensorwireServer,
) -> None:
    # The grant's call spends part of the deadline: gRPC gets only what is left; a
    # grant refused for overload keeps the next calls off the lane for a while.
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        method = client._transport._methods["Infer"]
        asked: list[float | None] = []
        given: list[float | None] = []
        fallback = method.fallback

        def overloaded(request: bytes, timeout: float | None = None, metadata: object = None):  # type: ignore[no-untyped-def]
            asked.append(timeout)
            time.sleep(0.3)
            raise client_lane.LaneRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")

        def grpc_call(request: bytes, timeout: float | None = None, metadata: object = None):  # type: ignore[no-untyped-def]
            given.append(timeout)
            return fallback(request, timeout=timeout, metadata=metadata)

        method.lane.open_lane = overloaded
        method.fallback = grpc_call
        for _ in range(2):
            np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
        assert len(asked) == 1  # the second call went straight to gRPC
        assert given[0] is not None and given[0] <= TIMEOUT - 0.3


def test_pooled_connections_past_descriptor_1024_are_reused(server: TensorwireServer) -> None:
    # select() refuses descriptors past 1024; the pool's check must not drop them.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("this process may not open 1200 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [open(os.devnull) for _ in range(1100)]  # noqa: SIM115
    try:
        with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
            client.infer("identity", SMALL)
            pooled = lane_of(client).idle[0][1]
            assert pooled.fileno() >= 1024
            client.infer("identity", SMALL)
            assert lane_of(client).idle[0][1] is pooled  # taken and given back, not dropped
    finally:
        for f in filler:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_forked_child_leaves_its_parents_pooled_connections(server: TensorwireServer) -> None:
    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        client.infer("identity", SMALL)
        lane = lane_of(client)
        assert len(lane.idle) == 1
        pid = os.fork()
        if pid == 0:  # the child: nothing of the parent's pool is offered
            os._exit(0 if lane.take() is None and not lane.idle else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pooled = lane.idle[0][1]
        client.infer("identity", SMALL)  # the parent's connection still serves it
        assert lane.idle[0][1] is pooled


def test_an_answer_to_another_call_breaks_the_connection_not_the_call(
    server: TensorwireServer,
) -> None:
    # Another process (a fork's) sends calls on a pooled connection: the next call
    # there reads an answer with another call's id. It fails as a broken lane would
    # (UNAVAILABLE, retried: answered) and the connection goes. The others' calls fill
    # the server's MAX_IN_FLIGHT and sleep, so this call's answer comes after theirs.
    from tensorwire._messages import infer_request
    from tensorwire.wire import lane as wire_lane

    with tw.Client(address(server), timeout=TIMEOUT, fast_lane=True) as client:
        client.infer("identity", SMALL)
        lane = lane_of(client)
        ((_, shared),) = lane.idle
        other = infer_request("sleeper", {"x": np.array(1.0)}, None, 0, False).finish()  # type: ignore[arg-type]
        for n in range(4):
            shared.sendall(b"".join(wire_lane.request_frame((1 << 40) + n, INFER, 9.0, b"", other)))
        np.testing.assert_array_equal(client.infer("identity", SMALL)["output"], SMALL)
        assert shared.fileno() == -1  # closed
        assert all(conn is not shared for _, conn in lane.idle)


INFER = "/tensorwire.v1.TensorService/Infer"


def test_one_deadline_and_the_overload_detour_on_the_async_client(server: TensorwireServer) -> None:
    async def main() -> tuple[list[float | None], list[float | None]]:
        async with tw.AsyncClient(address(server), timeout=TIMEOUT, fast_lane=True) as client:
            method = client._transport._methods["Infer"]
            asked: list[float | None] = []
            given: list[float | None] = []
            fallback = method.fallback

            async def overloaded(request: bytes, timeout: float | None = None, **_: object) -> None:
                asked.append(timeout)
                await asyncio.sleep(0.3)
                raise client_lane.LaneRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")

            async def grpc_call(
                request: bytes, timeout: float | None = None, metadata: object = None
            ) -> object:
                given.append(timeout)
                return await fallback(request, timeout=timeout, metadata=metadata)

            method.lane.open_lane = overloaded
            method.fallback = grpc_call
            for _ in range(2):
                out = (await client.infer("identity", SMALL))["output"]
                np.testing.assert_array_equal(out, SMALL)
            return asked, given

    asked, given = asyncio.run(main())
    assert len(asked) == 1  # the second call went straight to gRPC
    assert given[0] is not None and given[0] <= TIMEOUT - 0.3
