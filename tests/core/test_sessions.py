"""Sessions on the server, over raw gRPC: handles, ownership, quota, TTL, keep, Run
and training semantics, each checked against what the server itself reports."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import start

from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.v1 import tensorwire_pb2_grpc as pb_grpc
from tensorwire.wire.codec import Encoder, Handle, Ref, receive
from tensorwire.wire.protocol import SESSION_KEY
from tensorwire_server.core.sessions import Session, Sessions, owned
from tensorwire_server.server import TensorwireServer
from tensorwire_server.settings import Settings

TOKENS = "alice * alice-token-0123456789abcdef;bob * bob-token-0123456789abcdef0"


class Raw:
    """A TensorService stub speaking for one session (or none)."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.TensorServiceStub(self.channel)
        self.token = token
        self.session = ""

    def metadata(self) -> list[tuple[str, str]]:
        md = [(SESSION_KEY, self.session)] if self.session else []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md

    def __call__(self, method: str, encoder: Encoder[Any] | Any) -> Any:
        message = encoder.message if isinstance(encoder, Encoder) else encoder
        if isinstance(encoder, Encoder):
            message = type(message).FromString(encoder.finish())
        return getattr(self.stub, method)(message, metadata=self.metadata(), timeout=30)

    def open(self) -> Raw:
        self.session = self("OpenSession", pb.OpenSessionRequest()).session
        return self

    def put(self, arr: np.ndarray) -> Handle:
        encoder = Encoder(pb.PutRequest())
        encoder.tensor(encoder.message.tensor, arr)
        handle = receive(pb.PutResponse, self("Put", encoder).SerializeToString())
        result: Handle = handle.array(handle.message.tensor, "put")
        return result

    def get(self, handle: Handle | str) -> np.ndarray:
        handle_id = handle if isinstance(handle, str) else handle.id
        response = self("Get", pb.GetRequest(handle=handle_id))
        received = receive(pb.GetResponse, response.SerializeToString())
        return np.array(received.array(received.message.tensor, "get"))

    def call(self, function: str, *args: Any, keep: bool = False) -> Any:
        encoder = Encoder(pb.CallRequest(function=function, keep=keep))
        for i, arg in enumerate(args):
            encoder.value(encoder.message.args.add(), arg, str(i))
        response = self("Call", encoder)
        received = receive(pb.CallResponse, response.SerializeToString())
        return received.array(received.message.outputs[0].tensor, "output")

    def describe(self) -> pb.DescribeSessionResponse:
        return self("DescribeSession", pb.DescribeSessionRequest())

    def close(self) -> None:
        self.channel.close()


def code_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from start(Settings(host="127.0.0.1", port=0, device="cpu", session_quota_bytes=1 << 20))


@pytest.fixture
def raw(server: str) -> Iterator[Raw]:
    client = Raw(server).open()
    yield client
    client.close()


def test_put_get_and_keep_chain(raw: Raw) -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    h = raw.put(x)
    assert (h.dtype, h.shape) == ("float64", (3, 4))
    y = raw.call("matmul", h, np.ones((4, 2)), keep=True)
    assert isinstance(y, Handle) and y.shape == (3, 2)
    np.testing.assert_array_equal(raw.get(y), x @ np.ones((4, 2)))
    listed = [t.handle for t in raw.describe().handles]
    assert listed == [h.id, y.id]
    assert raw.describe().bytes == x.nbytes + 3 * 2 * 8


def test_a_handle_feeds_a_batched_model_and_keep_on_infer(raw: Raw) -> None:
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    h = raw.put(x)
    encoder = Encoder(pb.InferRequest(model="mlp", keep=True))
    encoder.named(encoder.message.inputs.add(), "", h)
    kept = raw("Infer", encoder).outputs[0].tensor
    assert kept.handle and list(kept.shape) == [5, 4]
    data = Encoder(pb.InferRequest(model="mlp"))
    data.named(data.message.inputs.add(), "", x)
    direct = receive(pb.InferResponse, raw("Infer", data).SerializeToString())
    np.testing.assert_array_equal(
        raw.get(kept.handle), direct.array(direct.message.outputs[0].tensor, "out")
    )


def test_unknown_freed_and_foreign_handles_are_not_found(server: str, raw: Raw) -> None:
    h = raw.put(np.ones(3, np.float32))
    freed = raw("Free", pb.FreeRequest(handles=[h.id]))
    assert freed.freed_bytes == 12
    for handle in (h.id, "h-0000000000000000"):
        with pytest.raises(grpc.RpcError) as excinfo:
            raw.get(handle)
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
        assert "not in this session" in excinfo.value.details()
    mine = raw.put(np.ones(3, np.float32))
    other = Raw(server).open()
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            other.get(mine.id)
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as excinfo:
            other("Free", pb.FreeRequest(handles=[mine.id]))
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
    finally:
        other.close()
    np.testing.assert_array_equal(raw.get(mine), np.ones(3, np.float32))


def test_no_session_and_unknown_session(server: str) -> None:
    bare = Raw(server)
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            bare.put(np.ones(2))
        assert code_of(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
        assert "OpenSession" in excinfo.value.details()
        bare.session = "made-up"
        with pytest.raises(grpc.RpcError) as excinfo:
            bare.put(np.ones(2))
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
    finally:
        bare.close()


def test_quota_names_itself_and_the_server_keeps_serving(raw: Raw) -> None:
    held = raw.put(np.zeros(100_000, np.float64))  # 800 kB of the 1 MiB quota
    with pytest.raises(grpc.RpcError) as excinfo:
        raw.put(np.zeros(50_000, np.float64))
    assert code_of(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota of 1048576 bytes" in excinfo.value.details()
    with pytest.raises(grpc.RpcError) as excinfo:
        raw.call("mul", held, 2.0, keep=True)  # kept results count too
    assert code_of(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = raw.put(np.ones(4, np.float32))
    np.testing.assert_array_equal(raw.get(small), np.ones(4, np.float32))


def test_ownership_follows_the_token() -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", tokens=TOKENS)
    for address in start(settings):
        alice = Raw(address, "alice-token-0123456789abcdef").open()
        bob = Raw(address, "bob-token-0123456789abcdef0")
        bob.session = alice.session  # bob learned alice's session id
        try:
            h = alice.put(np.ones(2, np.float32))
            with pytest.raises(grpc.RpcError) as excinfo:
                bob.get(h.id)
            assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
            np.testing.assert_array_equal(alice.get(h), np.ones(2, np.float32))
        finally:
            alice.close()
            bob.close()


def test_close_and_ttl_free_the_memory_the_server_counts() -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", session_ttl=0.5)
    for address in start(settings):
        raw = Raw(address).open()
        info = Raw(address)
        try:
            raw.put(np.ones(1000, np.float64))
            assert info("Info", pb.InfoRequest()).sessions.bytes == 8000
            freed = raw("CloseSession", pb.CloseSessionRequest()).freed_bytes
            assert freed == 8000
            assert info("Info", pb.InfoRequest()).sessions.count == 0
            raw.open()
            raw.put(np.ones(1000, np.float64))
            deadline = time.monotonic() + 10
            while info("Info", pb.InfoRequest()).sessions.count and time.monotonic() < deadline:
                time.sleep(0.1)
            summary = info("Info", pb.InfoRequest()).sessions
            assert (summary.count, summary.bytes) == (0, 0)
            with pytest.raises(grpc.RpcError) as excinfo:
                raw.describe()
            assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
        finally:
            raw.close()
            info.close()


# The killed client's script imports Raw from here, which imports conftest.
HERE = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]


def test_a_killed_client_leaves_nothing_after_the_ttl() -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", session_ttl=1.0)
    for address in start(settings):
        script = textwrap.dedent(
            f"""
            import sys, time, numpy as np
            sys.path[:0] = {HERE!r}
            from test_sessions import Raw
            raw = Raw({address!r}).open()
            raw.put(np.ones(1 << 16, np.float32))
            print("held", flush=True)
            time.sleep(60)
            """
        )
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        info = Raw(address)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "held"
            assert info("Info", pb.InfoRequest()).sessions.bytes == 4 << 16
            child.kill()
            child.wait(10)
            deadline = time.monotonic() + 10
            while info("Info", pb.InfoRequest()).sessions.bytes and time.monotonic() < deadline:
                time.sleep(0.1)
            assert info("Info", pb.InfoRequest()).sessions.bytes == 0
        finally:
            child.kill()
            info.close()


def test_session_limit_is_resource_exhausted() -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", max_sessions=2)
    for address in start(settings):
        clients = [Raw(address).open(), Raw(address).open()]
        try:
            with pytest.raises(grpc.RpcError) as excinfo:
                Raw(address).open()
            assert code_of(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "maximum of 2 sessions" in excinfo.value.details()
        finally:
            for client in clients:
                client.close()


def test_refs_outside_a_program_and_bad_programs_are_invalid(raw: Raw) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        raw.call("neg", Ref("x"))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "no input and no earlier step": (["ghost"], ""),
        "already taken": (["x"], "x"),
    }
    for expected, (refs, step_name) in cases.items():
        encoder = Encoder(pb.RunRequest())
        encoder.named(encoder.message.inputs.add(), "x", np.ones(2))
        step = encoder.message.steps.add(name=step_name, function="neg")
        for ref in refs:
            encoder.value(step.args.add(), Ref(ref), "arg")
        with pytest.raises(grpc.RpcError) as excinfo:
            raw("Run", encoder)
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in excinfo.value.details()
    encoder = Encoder(pb.RunRequest())
    for _ in range(65):
        encoder.message.steps.add(function="neg")
    with pytest.raises(grpc.RpcError) as excinfo:
        raw("Run", encoder)
    assert "at most 64 steps" in excinfo.value.details()


def test_a_program_matches_local_torch_outputs_and_gradients(raw: Raw) -> None:
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((6, 8)), rng.standard_normal((8, 16))
    hw = raw.put(w)
    encoder = Encoder(pb.RunRequest(outputs=["y", "loss"], loss="loss", wrt=["x", "w"]))
    message = encoder.message
    encoder.named(message.inputs.add(), "x", x)
    encoder.named(message.inputs.add(), "w", hw)
    steps = [
        ("h", "matmul", [Ref("x"), Ref("w")]),
        ("a", "tanh", [Ref("h")]),
        ("y", "", [Ref("a")]),  # the mlp64 model
        ("s", "linalg.svd", [Ref("y")]),
        ("p", "mul", [Ref("s.S"), Ref("s.S")]),
        ("loss", "sum", [Ref("p")]),
    ]
    for name, function, args in steps:
        step = message.steps.add(name=name)
        if function:
            step.function = function
        else:
            step.model = "mlp64"
        for arg in args:
            encoder.value(step.args.add(), arg, name)
    response = receive(pb.RunResponse, raw("Run", encoder).SerializeToString())
    got = {o.name: response.array(o.tensor, o.name) for o in response.message.outputs}
    grads = {g.name: response.array(g.tensor, g.name) for g in response.message.grads}

    from tensorwire_server.models.builtins import MLP

    mlp = MLP(dtype=torch.float64)
    tx = torch.from_numpy(x).requires_grad_(True)
    tw_ = torch.from_numpy(w).requires_grad_(True)
    y = mlp(torch.tanh(tx @ tw_))
    loss = (torch.linalg.svd(y).S ** 2).sum()
    gx, gw = torch.autograd.grad(loss, [tx, tw_])
    np.testing.assert_allclose(got["y"], y.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(got["loss"], loss.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grads["x"], gx.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads["w"], gw.numpy(), rtol=1e-9, atol=1e-12)


def test_training_errors_are_clear(raw: Raw) -> None:
    bad = {
        "optimizer 'rmsprop' is not available": pb.CreateTrainerRequest(
            model="mlp64", loss="mse", optimizer=pb.Optimizer(name="rmsprop")
        ),
        "loss 'hinge' is not available": pb.CreateTrainerRequest(
            model="mlp64", loss="hinge", optimizer=pb.Optimizer(name="sgd")
        ),
    }
    for expected, request in bad.items():
        with pytest.raises(grpc.RpcError) as excinfo:
            raw("CreateTrainer", request)
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in excinfo.value.details()
    request = pb.CreateTrainerRequest(model="mlp64", loss="mse", optimizer=pb.Optimizer(name="sgd"))
    request.optimizer.options["momentun"].float_value = 0.9
    with pytest.raises(grpc.RpcError) as excinfo:
        raw("CreateTrainer", request)
    assert "takes no option 'momentun'" in excinfo.value.details()
    with pytest.raises(grpc.RpcError) as excinfo:
        raw("CreateTrainer", pb.CreateTrainerRequest(model="nope", loss="mse"))
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND


def test_owned_copies_borrowed_buffers_and_small_views() -> None:
    frozen = np.frombuffer(b"\x00" * 64, dtype=np.float32)
    borrowed = torch.from_numpy(frozen.copy())  # numpy-backed storage is not resizable
    assert owned(borrowed).untyped_storage().data_ptr() != borrowed.data_ptr()
    assert owned(borrowed, private=True).data_ptr() == borrowed.data_ptr()
    big = torch.zeros(1000)
    assert owned(big[:10]).untyped_storage().nbytes() == 40
    assert owned(big).data_ptr() == big.data_ptr()


def test_freed_tensors_are_released() -> None:
    sessions = Sessions(1 << 20, 60.0, 4)
    session: Session = sessions.open("")
    tensor = torch.ones(100)
    handle = session.keep(tensor)
    ref = weakref.ref(session.tensor(handle.id, "t"))
    del tensor
    sessions.close(session)
    gc.collect()
    assert ref() is None
    sessions.stop()


def test_the_reaper_stops_with_the_server() -> None:
    server = TensorwireServer(Settings(host="127.0.0.1", port=0, device="cpu"))
    server.service.sessions.open("")
    server.stop(grace=0)
    assert server.service.sessions.count() == 0
