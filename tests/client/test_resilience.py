"""Resilience of the clients: the retry policy, retries against scripted failures,
deadlines, and real outages (a killed and restarted server, keepalive), from both
Client and AsyncClient.

Failures come from real servers on 127.0.0.1: tensorwire's own in a subprocess
(killed, restarted, stopped), and ``Scripted`` (tests/support/scripted.py), a small real gRPC
server that answers TensorService's method names with statuses chosen by the test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from support.scripted import PARTIAL, Run, Scripted, both_clients, free_port
from support.servers import TESTS, spawn_server

import tensorwire as tw
from tensorwire import AsyncClient, Client, Progress
from tensorwire._transport.methods import METHODS, SERVICE
from tensorwire._transport.status import BACKOFF_MAX, RETRY_CODES, backoff
from tensorwire.wire.protocol import CHANNEL_OPTIONS


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.server.stop(grace=None)


# ---------------------------------------------------------------------- the policy


def test_backoff_is_full_jitter_below_a_capped_exponential() -> None:
    ceilings = [backoff(n, rand=lambda: 1.0) for n in range(1, 9)]
    assert ceilings == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff(3, rand=lambda: 0.0) == 0.0
    assert backoff(10**6, rand=lambda: 1.0) == BACKOFF_MAX  # no overflow
    assert all(0 <= backoff(4) <= 0.4 for _ in range(100))
    assert set(RETRY_CODES) == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def test_every_service_method_declares_whether_it_may_be_sent_again() -> None:
    for method in SERVICE.methods:
        name = method.name.removesuffix("Stream")
        assert name in METHODS, f"{method.name}: add it to tensorwire._transport.methods.METHODS"
        assert METHODS[name].streamed or name == method.name
    # Admin actions are never sent twice: a second Load re-reads the files, a second
    # Unload finds nothing to unload. Nor is what makes, frees or changes a session's
    # state: a second Put holds the tensor twice, a second Step trains twice.
    assert {n for n, s in METHODS.items() if not s.idempotent} == {
        "Load",
        "Unload",
        "OpenSession",
        "CloseSession",
        "Put",
        "Free",
        "Run",
        "CreateTrainer",
        "Step",
    }


# ---------------------------------------------------------------------- retries


@both_clients
def test_unavailable_is_retried_until_the_server_answers(run: Run, scripted: Scripted) -> None:
    scripted.fail("Info", *[grpc.StatusCode.UNAVAILABLE] * 3)
    assert run(scripted.address, "info", timeout=10).server_version == ""
    assert scripted.calls["Info"] == 4


@both_clients
def test_a_call_a_stopping_server_cancels_is_sent_again(run: Run, scripted: Scripted) -> None:
    scripted.fail("Info", grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED)
    assert run(scripted.address, "info", timeout=10).server_version == ""
    assert scripted.calls["Info"] == 3
    scripted.fail("Info", always=grpc.StatusCode.CANCELLED)
    with pytest.raises(tw.CancelledError, match="scripted CANCELLED"):
        run(scripted.address, "info", timeout=10, retries=2)


@both_clients
def test_retries_stop_after_the_count_with_an_error_naming_the_target(
    run: Run, scripted: Scripted
) -> None:
    scripted.fail("Info", always=grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(tw.UnavailableError) as info:
        run(scripted.address, "info", timeout=10, retries=2)
    assert str(info.value) == (
        f"cannot reach tensorwire server at {scripted.address}: scripted UNAVAILABLE "
        "(after 3 attempts)"
    )
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert scripted.calls["Info"] == 3
    with pytest.raises(tw.UnavailableError):
        run(scripted.address, "info", timeout=10, retries=0)
    assert scripted.calls["Info"] == 4


@both_clients
@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, tw.InvalidArgumentError),
        (grpc.StatusCode.INTERNAL, tw.InternalError),
        (grpc.StatusCode.UNKNOWN, tw.InternalError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, tw.DeadlineExceededError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, tw.ResourceExhaustedError),
        (grpc.StatusCode.UNAUTHENTICATED, tw.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, tw.PermissionDeniedError),
        (grpc.StatusCode.ABORTED, tw.UnavailableError),  # shares the class, not the retry
        (grpc.StatusCode.NOT_FOUND, tw.NotFoundError),
    ],
)
def test_other_statuses_are_answers_and_never_retried(
    run: Run, scripted: Scripted, code: grpc.StatusCode, error: type[tw.TensorwireError]
) -> None:
    scripted.fail("Info", always=code)
    with pytest.raises(error, match=f"scripted {code.name}"):
        run(scripted.address, "info", timeout=10, retries=10)
    assert scripted.calls["Info"] == 1


@both_clients
def test_a_retried_stream_is_sent_again_from_its_start_and_progress_restarts(
    run: Run, scripted: Scripted
) -> None:
    scripted.fail("InferStream", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    x = np.arange(100_000, dtype=np.float64)
    seen: list[Progress] = []
    options = {"timeout": 10, "stream_threshold": 0, "chunk_size": 64 << 10}
    y = run(scripted.address, "infer", "m", x, progress=seen.append, **options)[""]
    assert y.tobytes() == x.tobytes()
    assert scripted.calls == {"InferStream": 3}
    assert scripted.uploaded == [x.nbytes] * 3
    uploads = [p for p in seen if p.stage == "upload"]
    assert uploads.count(Progress("upload", 0, x.nbytes)) == 3  # each attempt from 0
    assert next(p for p in seen if p.stage == "download") == Progress("download", 0, x.nbytes)
    assert seen[-1] == Progress("download", x.nbytes, x.nbytes)


@both_clients
def test_a_stream_is_not_retried_once_its_response_has_begun(run: Run, scripted: Scripted) -> None:
    scripted.fail("InferStream", PARTIAL)
    with pytest.raises(tw.UnavailableError, match="gone after the header"):
        run(scripted.address, "infer", "m", np.ones(10), timeout=10, stream_threshold=0)
    assert scripted.calls == {"InferStream": 1}


@both_clients
def test_a_response_too_large_for_one_message_is_streamed_and_that_retried(
    run: Run, scripted: Scripted
) -> None:
    scripted.fail("Infer", grpc.StatusCode.OUT_OF_RANGE)
    scripted.fail("InferStream", grpc.StatusCode.UNAVAILABLE)
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    y = run(scripted.address, "infer", "m", x, timeout=10)[""]
    assert np.array_equal(y, x) and y.dtype == x.dtype
    assert scripted.calls == {"Infer": 1, "InferStream": 2}  # the retry streams at once


@both_clients
def test_retries_end_within_the_deadline(run: Run, scripted: Scripted) -> None:
    scripted.fail("Info", always=grpc.StatusCode.UNAVAILABLE)
    start = time.monotonic()
    with pytest.raises((tw.UnavailableError, tw.DeadlineExceededError)):
        run(scripted.address, "info", timeout=1.0, retries=10_000)
    assert time.monotonic() - start < 1.5
    assert 3 <= scripted.calls["Info"] < 100


@both_clients
def test_an_unreachable_target_is_named_within_the_deadline(run: Run) -> None:
    target = f"127.0.0.1:{free_port()}"
    named = f"cannot reach tensorwire server at {target}: "
    start = time.monotonic()
    with pytest.raises(tw.UnavailableError) as info:
        run(target, "info", timeout=5.0)  # the retries run out well before the deadline
    assert time.monotonic() - start < 2.0
    assert str(info.value).startswith(named) and str(info.value).endswith("(after 5 attempts)")
    # Retries without end: the deadline ends them. The last attempt may be the one to
    # run out of time (DEADLINE_EXCEEDED), and then says why it was made.
    start = time.monotonic()
    with pytest.raises((tw.UnavailableError, tw.DeadlineExceededError)) as info:
        run(target, "info", timeout=0.8, retries=10_000)
    assert time.monotonic() - start < 1.3
    assert named in str(info.value)


def test_closing_a_client_ends_its_retries(scripted: Scripted) -> None:
    scripted.fail("Info", always=grpc.StatusCode.UNAVAILABLE)
    client = Client(scripted.address, timeout=30, retries=10_000)
    threading.Timer(0.5, client.close).start()
    start = time.monotonic()
    # Closed while backing off (almost surely): RuntimeError; during an attempt: CANCELLED.
    with pytest.raises((RuntimeError, tw.CancelledError), match=r"[Cc]losed"):
        client.info()
    assert time.monotonic() - start < 3.5  # at most one backoff of 2 s past the close


# ---------------------------------------------------------------------- real outages


@dataclass
class Outcome:
    started: float
    ended: float
    error: BaseException | None = None
    wrong: bool = False


def _unique(k: int, i: int) -> np.ndarray:
    return np.array([k, i, *np.random.default_rng([k, i]).standard_normal(6)])


def _answered(started: float, x: np.ndarray, y: np.ndarray) -> Outcome:
    wrong = y.dtype != x.dtype or y.shape != x.shape or y.tobytes() != x.tobytes()
    return Outcome(started, time.monotonic(), wrong=wrong)


def _sync_worker(address: str, k: int, stop: threading.Event, out: list[Outcome]) -> None:
    # Odd workers stream every request: both paths meet the outage.
    threshold = 0 if k % 2 else 1 << 20
    with Client(address, timeout=20, retries=100, stream_threshold=threshold) as c:
        i = 0
        while not stop.is_set():
            x = _unique(k, i)
            started = time.monotonic()
            try:
                y = c.infer("identity", x)["output"]
            except Exception as exc:  # judged by the test, not lost with the thread
                out.append(Outcome(started, time.monotonic(), error=exc))
            else:
                out.append(_answered(started, x, y))
            i += 1


async def _async_worker(address: str, k: int, stop: threading.Event, out: list[Outcome]) -> None:
    threshold = 0 if k % 2 else 1 << 20
    async with AsyncClient(address, timeout=20, retries=100, stream_threshold=threshold) as c:
        i = 0
        while not stop.is_set():
            x = _unique(k, i)
            started = time.monotonic()
            try:
                y = (await c.infer("identity", x))["output"]
            except Exception as exc:  # judged by the test, not lost with the thread
                out.append(Outcome(started, time.monotonic(), error=exc))
            else:
                out.append(_answered(started, x, y))
            i += 1


def _async_workers(address: str, ks: range, stop: threading.Event, out: list[Outcome]) -> None:
    async def all_of_them() -> None:
        await asyncio.gather(*(_async_worker(address, k, stop, out) for k in ks))

    asyncio.run(all_of_them())


def test_a_killed_and_restarted_server_gives_no_wrong_result_and_most_calls_succeed() -> None:
    outcomes: list[Outcome] = []
    stop = threading.Event()
    with spawn_server("--device", "cpu") as (proc, address, _):
        workers = [
            threading.Thread(target=_sync_worker, args=(address, k, stop, outcomes))
            for k in range(3)
        ]
        workers.append(
            threading.Thread(target=_async_workers, args=(address, range(3, 6), stop, outcomes))
        )
        for worker in workers:
            worker.start()
        try:
            time.sleep(1.0)
            killed = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            port = address.rsplit(":", 1)[1]
            with spawn_server("--device", "cpu", "--port", port) as (_, again, _):
                back = time.monotonic()
                assert again == address
                time.sleep(1.5)
                stop.set()  # and let the calls in flight finish while the server lives
                for worker in workers:
                    worker.join(30)
        finally:
            stop.set()
    assert not any(w.is_alive() for w in workers)
    assert not [o for o in outcomes if o.wrong], "a call got data that was not its own"
    failed = [o for o in outcomes if o.error is not None]
    expected = (tw.UnavailableError, tw.DeadlineExceededError)
    assert all(isinstance(o.error, expected) for o in failed), [repr(o.error) for o in failed]
    # A 20 s deadline outlasts the outage: only a call in flight at the kill may fail,
    # a stream whose response had begun (never sent twice).
    assert all(o.started < killed for o in failed), [str(o.error) for o in failed]
    assert len(failed) <= 6  # one call in flight per client
    assert len(outcomes) - len(failed) > 0.9 * len(outcomes)
    # Calls made while no server listened (it takes over a second to start), answered
    # by the next one: retried across the outage. Each client makes one.
    down = back - 0.5
    bridged = [o for o in outcomes if o.error is None and o.started < down and o.ended > back]
    assert len(bridged) >= 3, "calls were not carried over the outage"


def test_keepalive_waits_for_a_ping_answer_as_long_as_it_says() -> None:
    options = dict(CHANNEL_OPTIONS)
    # grpcio times keepalive pings out after ping_timeout_ms, whatever keepalive says.
    assert options["grpc.http2.ping_timeout_ms"] == options["grpc.keepalive_timeout_ms"]
    assert options["grpc.http2.max_pings_without_data"] == 0  # pings during long calls


def test_keepalive_notices_a_server_that_stops_answering_during_a_long_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), path])))
    # Pings every 0.5 s instead of every minute, answered within 1 s instead of 20.
    quick = [
        ("grpc.keepalive_time_ms", 500),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.http2.ping_timeout_ms", 1000),
    ]
    result: dict[str, Any] = {}
    flags = ("--device", "cpu", "--model", "sleeper=support.toy_models:sleeper")
    with (
        spawn_server(*flags) as (proc, address, _),
        Client(address, timeout=30, retries=0, options=quick) as client,
    ):
        client.info()  # connected, and the models loaded

        def long_call() -> None:
            try:
                client.infer("sleeper", np.array(25.0))
            except tw.TensorwireError as exc:
                result["error"] = exc
            result["ended"] = time.monotonic()

        caller = threading.Thread(target=long_call)
        caller.start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        stopped = time.monotonic()
        caller.join(20)
    assert isinstance(result.get("error"), tw.UnavailableError), result
    assert result["ended"] - stopped < 6
    assert f"cannot reach tensorwire server at {address}" in str(result["error"])
