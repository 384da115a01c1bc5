"""Resilience and security of the clients: retries, keepalive, reachability errors,
TLS and tokens, from both Client and AsyncClient and the command line.

Failures come from real servers on 127.0.0.1: tensorwire's own in a subprocess
(killed, restarted, stopped), and ``Scripted``, a small real gRPC server that answers
TensorService's method names with statuses chosen by the test, counts the attempts
and echoes the ``authorization`` metadata and the TLS peer back in InfoResponse.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trustme
from conftest import TESTS, spawn_server

import tensorwire as tw
from tensorwire import AsyncClient, Client, Progress
from tensorwire._transport import (
    BACKOFF_MAX,
    METHODS,
    RETRY_CODES,
    SERVICE,
    backoff,
)
from tensorwire.channel import is_loopback
from tensorwire.cli import main
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import streaming
from tensorwire.wire.codec import Encoder, receive
from tensorwire.wire.protocol import CHANNEL_OPTIONS

#: Answer the part of the response after its header with UNAVAILABLE (streams only).
PARTIAL = "partial"
Action = grpc.StatusCode | str | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def identity(inputs: Any) -> Encoder[pb.InferResponse]:
    """An InferResponse holding ``inputs`` (decoded NamedTensors) as its outputs."""
    encoder = Encoder(pb.InferResponse())
    for name, arr in inputs:
        encoder.named(encoder.message.outputs.add(), name, arr)
    return encoder


class Scripted:
    """A real gRPC server with TensorService's Info, Infer and InferStream, failing
    each attempt as ``script`` says (then answering: Info echoes the caller, Infer
    returns its inputs), counting attempts and the request bytes streams delivered."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.script: dict[str, list[Action]] = {}
        self.always: dict[str, Action] = {}
        self.calls: Counter[str] = Counter()
        self.uploaded: list[int] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Info": grpc.unary_unary_rpc_method_handler(self.info),
            "Infer": grpc.unary_unary_rpc_method_handler(self.infer),
            "InferStream": grpc.stream_stream_rpc_method_handler(self.infer_stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def fail(self, method: str, *actions: Action, always: Action = None) -> None:
        """Answer the next calls of ``method`` with ``actions``, then with ``always``."""
        self.script[method] = list(actions)
        self.always[method] = always

    def _next(self, method: str) -> Action:
        with self.lock:
            self.calls[method] += 1
            script = self.script.get(method)
            return script.pop(0) if script else self.always.get(method)

    def info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        action = self._next("Info")
        if isinstance(action, grpc.StatusCode):
            context.abort(action, f"scripted {action.name}")
        metadata = dict(context.invocation_metadata())
        peer = context.auth_context().get("x509_common_name", [b""])
        return pb.InfoResponse(
            server_version=str(metadata.get("authorization", "")),
            torch_version=peer[0].decode(),
        ).SerializeToString()

    def infer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        action = self._next("Infer")
        if isinstance(action, grpc.StatusCode):
            context.abort(action, f"scripted {action.name}")
        received = receive(pb.InferRequest, request)
        return identity(received.named(received.message.inputs, "input")).finish()

    def infer_stream(
        self, parts: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        receiver = streaming.StreamReceiver(pb.InferRequest)
        for raw in parts:
            receiver.feed(raw)
        received = receiver.finish()
        self.uploaded.append(receiver.received)
        action = self._next("InferStream")
        if isinstance(action, grpc.StatusCode):
            context.abort(action, f"scripted {action.name}")
        response = streaming.parts(identity(received.named(received.message.inputs, "input")))
        if action == PARTIAL:
            yield next(response)
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: gone after the header")
        yield from response


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.server.stop(grace=None)


Run = Callable[..., Any]
#: Keywords that go to the method; the others go to the client's constructor.
CALL_KEYWORDS = {"progress"}


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    call = {k: v for k, v in options.items() if k in CALL_KEYWORDS}
    return {k: v for k, v in options.items() if k not in call}, call


def run_sync(target: str, method: str, *args: Any, **options: Any) -> Any:
    """``Client(target, **options).method(*args)``, and close the client."""
    client_options, call_options = _split(options)
    with Client(target, **client_options) as c:
        return getattr(c, method)(*args, **call_options)


def run_async(target: str, method: str, *args: Any, **options: Any) -> Any:
    """The same with an AsyncClient, in a new event loop."""
    client_options, call_options = _split(options)

    async def go() -> Any:
        async with AsyncClient(target, **client_options) as c:
            return await getattr(c, method)(*args, **call_options)

    return asyncio.run(go())


both_clients = pytest.mark.parametrize("run", [run_sync, run_async], ids=["sync", "async"])


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
        assert name in METHODS, f"{method.name}: add it to tensorwire._transport.METHODS"
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
    flags = ("--device", "cpu", "--model", "sleeper=toy_models:sleeper")
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


# ---------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv6:[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/localhost:50051", False),
        ("unix:/run/tensorwire.sock", True),
        ("gpu-box:50051", False),
        ("localhost.example.com:1", False),
        ("10.0.0.7:50051", False),
        ("0.0.0.0:50051", False),
        ("[2001:db8::1]:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("dns:///gpu-box:50051", False),
        ("dns:50051", False),
    ],
)
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_token_is_refused_in_plain_text_to_another_machine(cls: type[Any]) -> None:
    for target in ("gpu-box:50051", "10.1.2.3:50051", "dns:///gpu-box:1"):
        with pytest.raises(ValueError, match=f"plain text to {target}") as info:
            cls(target, token="s3cret-token")
        assert "s3cret-token" not in str(info.value)
    for bad in ("", "two words", "line\nbreak", "caf\u00e9"):
        with pytest.raises(ValueError, match="printable ASCII") as info:
            cls("127.0.0.1:1", token=bad)
        assert bad not in str(info.value) or not bad


def test_a_token_never_shows_in_repr() -> None:
    with Client("127.0.0.1:1", token="s3cret-token") as c:
        assert repr(c) == "Client('127.0.0.1:1', secure=False, token=<hidden>)"
        assert "s3cret" not in repr(vars(c))
    with Client("gpu-box:1", tls=True, token="s3cret-token") as c:  # TLS: any target
        assert "s3cret" not in repr(c) and "secure=True" in repr(c)
    assert repr(Client("127.0.0.1:1")) == "Client('127.0.0.1:1', secure=False)"


@both_clients
def test_the_token_travels_as_bearer_metadata_on_every_call(run: Run, scripted: Scripted) -> None:
    scripted.fail("Info", grpc.StatusCode.UNAVAILABLE)  # the retry carries it too
    info = run(scripted.address, "info", timeout=10, token="s3cret-token")
    assert info.server_version == "Bearer s3cret-token"
    assert run(scripted.address, "info", timeout=10).server_version == ""


@both_clients
def test_refused_tokens_map_to_their_errors_without_the_token(run: Run, scripted: Scripted) -> None:
    for code, error in [
        (grpc.StatusCode.UNAUTHENTICATED, tw.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, tw.PermissionDeniedError),
    ]:
        scripted.fail("Info", code)
        with pytest.raises(error) as info:
            run(scripted.address, "info", timeout=10, token="s3cret-token")
        assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: trustme.CA
    server: Scripted
    dir: Path

    @property
    def ca_pem(self) -> bytes:
        return bytes(self.ca.cert_pem.bytes())


def _tls_server(ca: trustme.CA, require_client_auth: bool) -> Scripted:
    cert = ca.issue_cert("tensorwire.test", "127.0.0.1")
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), chain)],
        root_certificates=ca.cert_pem.bytes() if require_client_auth else None,
        require_client_auth=require_client_auth,
    )
    return Scripted(credentials)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("client.test", common_name="client.test")
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    (tmp_path / "client.pem").write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    server = _tls_server(ca, require_client_auth=False)
    yield Pki(ca, server, tmp_path)
    server.server.stop(grace=None)


@both_clients
def test_tls_from_pem_bytes_and_from_paths(run: Run, pki: Pki) -> None:
    address = pki.server.address
    for roots in (pki.ca_pem, str(pki.dir / "ca.pem"), pki.dir / "ca.pem"):
        info = run(address, "info", timeout=10, root_certificates=roots, token="t0k")
        assert info.server_version == "Bearer t0k"
    # The certificate names tensorwire.test and 127.0.0.1; another name must be asked for.
    named = run(
        address, "info", timeout=10, root_certificates=pki.ca_pem, server_name="tensorwire.test"
    )
    assert named.server_version == ""
    with pytest.raises(tw.UnavailableError, match=f"cannot reach tensorwire server at {address}"):
        run(address, "info", timeout=5, root_certificates=pki.ca_pem, server_name="other.test")
    with pytest.raises(tw.UnavailableError):  # plain text to a TLS port
        run(address, "info", timeout=5, retries=0)


@both_clients
def test_a_client_certificate_from_files_identifies_the_client(run: Run, pki: Pki) -> None:
    server = _tls_server(pki.ca, require_client_auth=True)
    try:
        info = run(
            server.address,
            "info",
            timeout=10,
            root_certificates=pki.dir / "ca.pem",
            certificate_chain=pki.dir / "client.pem",
            private_key=str(pki.dir / "client.key"),
        )
        assert info.torch_version == "client.test"  # the peer the server saw
        with pytest.raises(tw.UnavailableError):
            run(server.address, "info", timeout=5, retries=1, root_certificates=pki.ca_pem)
    finally:
        server.server.stop(grace=None)


def test_contradicting_or_unreadable_tls_settings_are_refused(pki: Pki) -> None:
    ca = pki.dir / "ca.pem"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls": False, "root_certificates": ca}, "tls=False contradicts root_certificates"),
        ({"certificate_chain": pki.dir / "client.pem"}, "both certificate_chain and private_key"),
        ({"private_key": pki.dir / "client.key"}, "both certificate_chain and private_key"),
        ({"root_certificates": pki.ca_pem.decode()}, "pass PEM text as bytes"),
        ({"root_certificates": b"not a certificate"}, "root_certificates: not PEM"),
        ({"server_name": "x.test"}, "server_name= .* needs TLS"),
        (
            {"credentials": grpc.ssl_channel_credentials(), "root_certificates": ca},
            "credentials= replaces",
        ),
    ]
    for kwargs, message in cases:
        for cls in (Client, AsyncClient):
            with pytest.raises(ValueError, match=message):
                cls("127.0.0.1:1", **kwargs)
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", root_certificates=pki.dir / "missing.pem")
    with pytest.raises(ValueError, match="retries"):
        Client("127.0.0.1:1", retries=-1)


# ---------------------------------------------------------------------- command line


def _info_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "info", "--json"]) == 0, capsys.readouterr().err
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_cli_reads_the_token_from_a_file_or_the_environment(
    scripted: Scripted,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = ["--target", scripted.address]
    monkeypatch.delenv("TENSORWIRE_TOKEN", raising=False)
    assert _info_json(capsys, *target)["server_version"] == ""
    monkeypatch.setenv("TENSORWIRE_TOKEN", "from-env")
    assert _info_json(capsys, *target)["server_version"] == "Bearer from-env"
    (tmp_path / "token").write_text("from-file\n")
    data = _info_json(capsys, *target, "--token-file", str(tmp_path / "token"))
    assert data["server_version"] == "Bearer from-file"  # the file wins, its newline dropped


def test_cli_connection_errors_are_usage_errors_without_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORWIRE_TOKEN", "s3cret-token")
    assert main(["--target", "gpu-box:50051", "info"]) == 2
    err = capsys.readouterr().err
    assert "refusing to send a token in plain text to gpu-box:50051" in err
    assert "s3cret" not in err
    monkeypatch.delenv("TENSORWIRE_TOKEN")
    (tmp_path / "empty").write_text("\n")
    for flags, message in [
        (["--token-file", str(tmp_path / "missing")], "missing: cannot read: No such file"),
        (["--token-file", str(tmp_path / "empty")], "the file is empty"),
        (["--tls-ca", str(tmp_path / "missing.pem")], "missing.pem: cannot read"),
        (["--tls-cert", str(tmp_path / "empty")], "--tls-cert and --tls-key go together"),
        (["--server-name", "x.test"], "--server-name names the server's TLS certificate"),
        (["--tls-ca", str(tmp_path / "empty")], "empty: not PEM"),
    ]:
        assert main(["--target", "127.0.0.1:1", *flags, "info"]) == 2
        assert message in capsys.readouterr().err


def test_cli_tls_flags_reach_a_tls_server(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    server = _tls_server(pki.ca, require_client_auth=True)
    try:
        flags = [
            "--target",
            server.address,
            "--tls-ca",
            str(pki.dir / "ca.pem"),
            "--tls-cert",
            str(pki.dir / "client.pem"),
            "--tls-key",
            str(pki.dir / "client.key"),
            "--server-name",
            "tensorwire.test",
        ]
        assert _info_json(capsys, *flags)["torch_version"] == "client.test"
    finally:
        server.server.stop(grace=None)


def test_cli_has_no_flag_that_takes_the_token_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    for flag in ("--tls ", "--tls-ca", "--tls-cert", "--tls-key", "--server-name", "--token-file"):
        assert flag in usage
    assert "--token " not in usage and "--token=" not in usage
    for argv in (["--token", "s3cret", "info"], ["--token=s3cret", "info"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "use --token-file FILE or $TENSORWIRE_TOKEN" in err and "s3cret" not in err
