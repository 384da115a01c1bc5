"""Remote tensors and programs through the client: sessions, handles, keep, Run."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from conftest import start
from support.arrays import sample

import tensorwire as tw
from tensorwire import AsyncClient, Client, NotFoundError
from tensorwire.wire.dtypes import NAMES, NUMPY_BY_WIRE
from tensorwire_server.models.builtins import MLP
from tensorwire_server.settings import Settings


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    """A server of two sessions at most, of 4 KiB each, that expire after 0.5 s unused."""
    settings = Settings(
        host="127.0.0.1",
        port=0,
        device="cpu",
        session_ttl=0.5,
        session_quota_bytes=4096,
        max_sessions=2,
    )
    yield from start(settings)


def sessions_open(address: str) -> int:
    with Client(address) as c:
        summary = c.info().sessions
    assert summary is not None
    return summary.count


# ---------------------------------------------------------------------- handles


@pytest.mark.parametrize("dtype", list(NUMPY_BY_WIRE.values()), ids=NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (2, 0), (3, 5), (300, 70)], ids=str)
def test_put_and_get_every_dtype_bit_exact(client: Client, dtype: np.dtype, shape) -> None:  # type: ignore[no-untyped-def]
    arr = sample(dtype, shape)
    with client.put(arr) as t:
        assert (t.dtype, t.shape, t.ndim, t.nbytes) == (dtype, shape, len(shape), arr.nbytes)
        out = t.numpy()
    assert out.dtype == dtype and out.shape == shape and out.flags.writeable
    assert out.tobytes() == arr.tobytes()


def test_large_tensors_stream_both_ways(address: str) -> None:
    arr = np.random.default_rng(0).standard_normal((700, 1000))  # 5.6 MB
    seen: list[tw.Progress] = []
    with (
        Client(address, stream_threshold=1 << 20, chunk_size=1 << 18) as c,
        c.put(arr, progress=seen.append) as t,
    ):
        upload = [p.done for p in seen if p.stage == "upload"]
        assert upload[-1] == arr.nbytes and len(upload) > 10  # chunk by chunk
        np.testing.assert_array_equal(t.numpy(), arr)
        # A handle next to large data in one streamed request lands where it belongs.
        big = np.ones((700, 1000))
        np.testing.assert_array_equal(c.call("add", t, big), arr + 1)
        np.testing.assert_array_equal(c.call("add", big, t, keep=True).numpy(), arr + 1)


def test_keep_chains_results_on_the_server(client: Client) -> None:
    x = np.arange(16, dtype=np.float64).reshape(4, 4)
    h = client.put(x)
    y = client.call("matmul", h, h, keep=True)
    assert isinstance(y, tw.RemoteTensor) and y.shape == (4, 4) and y.dtype == np.float64
    np.testing.assert_array_equal(y.numpy(), x @ x)
    z = client.call("add", y, x)  # a remote tensor and an array in one call
    np.testing.assert_array_equal(z, x @ x + x)

    u, s, vh = client.call("linalg.svd", y, keep=True)
    assert [t.shape for t in (u, s, vh)] == [(4, 4), (4,), (4, 4)]
    want = np.linalg.svd(x @ x, compute_uv=False)
    np.testing.assert_allclose(s.numpy(), want, rtol=1e-10, atol=1e-10 * want[0])

    inputs = np.random.default_rng(1).standard_normal((3, 16))
    remote = client.put(inputs)
    kept = client.infer("mlp64", remote, keep=True)
    np.testing.assert_array_equal(kept["output"].numpy(), client.infer("mlp64", inputs)["output"])
    grads = client.grad("mlp64", {"input": remote}, grad_outputs=np.ones((3, 4)), keep=True)
    plain = client.grad("mlp64", {"input": inputs}, grad_outputs=np.ones((3, 4)))
    assert isinstance(grads.grads["input"], tw.RemoteTensor)
    np.testing.assert_array_equal(grads.grads["input"].numpy(), plain.grads["input"])
    np.testing.assert_array_equal(grads.outputs["output"].numpy(), plain.outputs["output"])
    client.free(
        h, y, u, s, vh, remote, kept["output"], *grads.outputs.values(), grads.grads["input"]
    )
    assert client.session_info().handles == ()


def test_with_blocks_free_and_garbage_collection_frees_on_the_next_call(address: str) -> None:
    with Client(address) as c:
        x = np.ones((64, 64), np.float32)
        with c.put(x) as t:
            info = c.session_info()
            assert info.handles == (t.handle,) and info.bytes == x.nbytes
            assert info.quota_bytes > 0 and info.ttl_seconds > 0
        assert t.freed and "freed" in repr(t)
        assert c.session_info().bytes == 0

        kept = [c.put(x) for _ in range(3)]
        assert len(c.session_info().handles) == 3
        del kept
        gc.collect()  # finalizers queue the ids; no call to the server from them
        info = c.session_info()  # the next call frees all three first, in one Free
        assert info.handles == () and info.bytes == 0


def test_a_run_carries_what_garbage_collection_freed(address: str) -> None:
    with Client(address) as c:
        frees: list[list[str]] = []
        flush = c._session.free

        def spy(session: object, ids: list[str], timeout: object) -> object:  # counts Free calls
            frees.append(ids)
            return flush(session, ids, timeout)  # type: ignore[arg-type]

        c._session.free = spy  # type: ignore[method-assign,assignment]
        dropped = [c.put(np.ones(4)) for _ in range(2)]
        ids = [t.handle.id for t in dropped]
        del dropped
        gc.collect()
        p = tw.Program()
        p.call("neg", p.input("x"))
        np.testing.assert_array_equal(c.run(p, {"x": np.ones(2)})["s0"], -np.ones(2))
        info = c.session_info()
        assert frees == [] and not {h.id for h in info.handles} & set(ids)  # in the Run


def test_a_freed_handle_is_not_found(client: Client) -> None:
    t = client.put(np.arange(3.0))
    handle = t.handle
    t.free()
    t.free()  # twice is harmless
    assert repr(t) == f"RemoteTensor(id={handle.id!r}, dtype=float64, shape=(3,), freed)"
    with pytest.raises(NotFoundError, match="freed"):  # known here, without a call
        t.numpy()
    with pytest.raises(NotFoundError, match="not in this session"):  # and on the server
        client.call("neg", handle)


def test_clients_cannot_see_each_others_tensors(address: str) -> None:
    with Client(address) as a, Client(address) as b:
        t = a.put(np.arange(4.0))
        with pytest.raises(NotFoundError):
            b.call("neg", t.handle)
        with pytest.raises(ValueError, match="another client"):
            b.call("neg", t)
        with pytest.raises(ValueError, match="another client"):
            b.free(t)
        np.testing.assert_array_equal(a.call("neg", t), -np.arange(4.0))


def test_close_ends_the_session_and_its_tensors(address: str) -> None:
    before = sessions_open(address)
    c = Client(address)
    t = c.put(np.zeros(10))
    assert sessions_open(address) == before + 1
    c.close()
    assert sessions_open(address) == before
    assert t.freed
    with pytest.raises(RuntimeError, match="closed"):
        t.numpy()
    t.free()  # nothing left to free: harmless


def test_stateless_calls_open_no_session(address: str) -> None:
    before = sessions_open(address)
    with Client(address) as c:
        c.infer("mlp64", np.ones((1, 16)))
        c.call("neg", np.ones(2))
        assert sessions_open(address) == before


def test_an_expired_session_is_a_clear_error_and_the_next_call_opens_another(
    limited: str,
) -> None:
    with Client(limited) as c:
        t = c.put(np.arange(5.0))
        time.sleep(1.2)
        with pytest.raises(NotFoundError, match="no longer has this client's session"):
            t.numpy()
        assert t.freed
        with pytest.raises(NotFoundError, match="expired"):  # known locally from now on
            c.call("neg", t)
        fresh = c.put(np.arange(2.0))
        np.testing.assert_array_equal(fresh.numpy(), np.arange(2.0))


def test_session_limits(limited: str) -> None:
    with Client(limited) as a, Client(limited) as b, Client(limited) as c:
        t = a.put(np.zeros(300))  # 2400 bytes of the 4 KiB quota
        with pytest.raises(tw.ResourceExhaustedError, match="quota"):
            a.put(np.zeros(512))
        with pytest.raises(tw.ResourceExhaustedError, match="quota"):
            a.call("add", t, t, keep=True)
        b.put(np.zeros(1))
        with pytest.raises(tw.ResourceExhaustedError, match="sessions"):
            c.put(np.zeros(1))  # a third session
        a.free(t)
        small = a.put(np.arange(100.0))
        copy = a.put(small)  # a remote tensor given to put is copied there
        assert copy.handle != small.handle
        np.testing.assert_array_equal(copy.numpy(), np.arange(100.0))
        assert a.session_info().bytes == 1600


def test_a_remote_tensor_is_no_array(client: Client) -> None:
    with client.put(np.ones(3)) as t, pytest.raises(TypeError, match="numpy\\(\\)"):
        np.asarray(t)


# ---------------------------------------------------------------------- programs


def chain() -> tuple[tw.Program, dict[str, tw.Ref]]:
    p = tw.Program()
    x, w, b = p.input("x"), p.input("w"), p.input("b")
    h = p.call("matmul", x, w)
    a = p.call("add", h, b)
    t = p.call("tanh", a, name="act")
    y = p.infer("mlp64", t)
    sq = p.call("mul", y, y)
    loss = p.call("sum", sq)
    return p, {"y": y, "loss": loss, "act": t}


def local_chain(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    model = MLP(dtype=torch.float64)
    tx, tw_, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    y = model(torch.tanh(tx @ tw_ + tb))
    loss = (y * y).sum()
    loss.backward()
    return {
        "y": y.detach().numpy(),
        "loss": loss.detach().numpy(),
        "x": tx.grad.numpy(),  # type: ignore[union-attr]
        "w": tw_.grad.numpy(),  # type: ignore[union-attr]
        "b": tb.grad.numpy(),  # type: ignore[union-attr]
    }


def test_a_program_matches_local_torch_outputs_and_gradients(client: Client) -> None:
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((5, 8)), rng.standard_normal((8, 16)), rng.standard_normal(16)
    want = local_chain(x, w, b)
    p, refs = chain()
    assert p.steps == ("s0", "s1", "act", "s3", "s4", "s5")
    remote_w = client.put(w)  # data and handles mix
    r = client.run(
        p, {"x": x, "w": remote_w, "b": b}, outputs=[refs["y"], refs["loss"]], loss=refs["loss"]
    )
    assert list(r.outputs) == ["s3", "s5"] and r[refs["y"]] is r.outputs["s3"]
    np.testing.assert_allclose(r[refs["y"]], want["y"], rtol=1e-12)
    np.testing.assert_allclose(r["s5"], want["loss"], rtol=1e-12)
    assert set(r.grads) == {"x", "w", "b"}  # every floating point input by default
    for name in ("x", "w", "b"):
        np.testing.assert_allclose(r.grads[name], want[name], rtol=1e-10, atol=1e-12)

    only_w = client.run(p, {"x": x, "w": w, "b": b}, loss=refs["loss"], wrt="w")
    assert list(only_w.grads) == ["w"] and list(only_w.outputs) == ["s5"]  # the last step

    kept = client.run(p, {"x": x, "w": remote_w, "b": b}, outputs=[refs["act"]], keep=True)
    act = kept[refs["act"]]
    assert isinstance(act, tw.RemoteTensor) and act.shape == (5, 16)
    np.testing.assert_allclose(act.numpy(), np.tanh(x @ w + b), rtol=1e-12)
    # A kept result feeds the next call without coming back.
    np.testing.assert_allclose(client.infer("mlp64", act)["output"], want["y"], rtol=1e-12)


def test_a_program_step_with_several_outputs(client: Client) -> None:
    a = np.random.default_rng(3).standard_normal((4, 3))
    p = tw.Program()
    svd = p.call("linalg.svd", p.input("a"), full_matrices=False)
    s = svd.output("S")
    total = p.call("sum", s)
    r = client.run(p, {"a": a}, outputs=[s, total])
    assert list(r.outputs) == ["s0.S", "s1"]
    np.testing.assert_allclose(r[s], np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(r[total], np.linalg.svd(a, compute_uv=False).sum(), rtol=1e-12)


def test_a_program_returns_values_and_keeps_intermediates_in_one_call(client: Client) -> None:
    a = np.random.default_rng(5).standard_normal((6, 4))
    p = tw.Program()
    svd = p.call("linalg.svd", p.input("a"), full_matrices=False)
    total = p.call("sum", svd.output("S"))
    r = client.run(p, {"a": a}, outputs=[total], kept=[svd.output("Vh"), total])
    assert list(r.outputs) == ["s1"] and isinstance(r[total], np.ndarray)
    assert list(r.kept) == ["s0.Vh", "s1"]
    vh, kept_total = r.kept["s0.Vh"], r.kept["s1"]
    assert isinstance(vh, tw.RemoteTensor) and vh.shape == (4, 4)
    np.testing.assert_allclose(kept_total.numpy(), r[total], rtol=1e-12)
    # A later program starts from the kept intermediate, without computing it again.
    q = tw.Program()
    projected = q.call("matmul", q.input("a"), q.call("transpose", q.input("vh"), 0, 1))
    again = client.run(q, {"a": a, "vh": vh}, outputs=[projected])
    _, _, want_vh = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(np.abs(again[projected]), np.abs(a @ want_vh.T), rtol=1e-10)
    with pytest.raises(tw.InvalidArgumentError, match="ghost"):
        client.run(p, {"a": a}, kept=["ghost"])
    client.free(vh, kept_total)

    async def go() -> None:
        async with AsyncClient(client.target) as c:
            ar = await c.run(p, {"a": a}, outputs=[total], kept=[svd.output("S")])
            assert isinstance(ar.kept["s0.S"], tw.AsyncRemoteTensor)
            np.testing.assert_allclose(await ar.kept["s0.S"].numpy(), np.linalg.svd(a)[1])

    asyncio.run(go())


def test_programs_are_checked_before_sending(client: Client) -> None:
    p = tw.Program()
    x = p.input("x")
    with pytest.raises(ValueError, match="taken"):
        p.input("x")
    with pytest.raises(ValueError, match=r"no '\.'"):
        p.input("a.b")
    elsewhere = tw.Program()
    other = elsewhere.call("neg", elsewhere.input("z"))
    with pytest.raises(ValueError, match="neither an input"):
        p.call("neg", other)
    p.call("neg", x)
    with pytest.raises(ValueError, match="missing"):
        client.run(p, {})
    with pytest.raises(ValueError, match="unknown"):
        client.run(p, {"x": np.ones(2), "y": np.ones(2)})
    long = tw.Program()
    ref: tw.Ref = long.input("x")
    for _ in range(64):
        ref = long.call("neg", ref)
    with pytest.raises(ValueError, match="at most 64"):
        long.call("neg", ref)
    np.testing.assert_array_equal(client.run(long, {"x": np.ones(2)})["s63"], np.ones(2))
    # What only the server knows, it says: an unknown function.
    bad = tw.Program()
    bad.call("no_such_function", bad.input("x"))
    with pytest.raises(NotFoundError):
        client.run(bad, {"x": np.ones(2)})


# ---------------------------------------------------------------------- async


def test_async_twins(address: str) -> None:
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 8)), rng.standard_normal((8, 16)), rng.standard_normal(16)
    want = local_chain(x, w, b)

    async def go() -> None:
        async with AsyncClient(address) as c:
            async with await c.put(x) as t:
                assert isinstance(t, tw.AsyncRemoteTensor)
                np.testing.assert_array_equal(await t.numpy(), x)
                y = await c.call("matmul", t, w, keep=True)
                assert isinstance(y, tw.AsyncRemoteTensor)
                np.testing.assert_allclose(await y.numpy(), x @ w, rtol=1e-12)
                kept = await c.infer("mlp64", {"input": np.tanh(x @ w + b)}, keep=True)
                np.testing.assert_allclose(await kept["output"].numpy(), want["y"], rtol=1e-12)
                await c.free(y, kept["output"])
            assert t.freed
            p, refs = chain()
            r = await c.run(p, {"x": x, "w": w, "b": b}, loss=refs["loss"], wrt=["w"])
            np.testing.assert_allclose(r.grads["w"], want["w"], rtol=1e-10)
            leftover = await c.put(x)
            del leftover
            gc.collect()
            info = await c.session_info()
            assert info.handles == () and info.bytes == 0

    before = sessions_open(address)

    async def concurrently() -> None:
        async with AsyncClient(address) as c:
            # Concurrent first calls open one session between them.
            many = await asyncio.gather(*(c.put(np.full(3, i)) for i in range(8)))
            assert len((await c.session_info()).handles) == 8
            assert sessions_open(address) == before + 1
            await c.free(*many)

    asyncio.run(go())
    asyncio.run(concurrently())
    assert sessions_open(address) == before


def test_threads_share_one_session(address: str) -> None:
    before = sessions_open(address)
    with Client(address) as c, ThreadPoolExecutor(8) as pool:
        tensors = list(pool.map(lambda i: c.put(np.full(2, float(i))), range(16)))
        assert sessions_open(address) == before + 1
        sums = list(pool.map(lambda t: float(c.call("sum", t)), tensors))
        assert sums == [2.0 * i for i in range(16)]


@pytest.fixture(scope="module")
def two_replicas() -> Iterator[list[str]]:
    with ExitStack() as stack:
        addresses = []
        for _ in range(2):
            server = start(Settings(host="127.0.0.1", port=0, device="cpu"))
            addresses.append(next(server))
            stack.callback(server.close)
        yield addresses


def test_stateful_calls_go_to_one_replica(two_replicas: list[str]) -> None:
    with Client(two_replicas) as c:
        t = c.put(np.arange(3.0))
        for _ in range(6):  # round robin would send half of these to the other replica
            np.testing.assert_array_equal(c.call("neg", t), -np.arange(3.0))
            np.testing.assert_array_equal(c.call("neg", t, keep=True).numpy(), -np.arange(3.0))
        assert sorted(sessions_open(a) for a in two_replicas) == [0, 1]
    assert [sessions_open(a) for a in two_replicas] == [0, 0]
