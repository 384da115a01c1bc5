"""Remote arrays are lazy and fused: nothing runs until a value is asked for, then the
pending graph runs as one program that returns only what was asked; graphs past the
program limit are cut, not refused; AsyncClient awaits; gradients come through the
same graph; unsupported functions raise, naming themselves, without computing."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import tensorwire.arrays as ta
from tensorwire import AsyncClient, Client
from tensorwire.errors import InvalidArgumentError
from tensorwire.wire.protocol import MAX_PROGRAM_STEPS


class Counting:
    """A client that records each call it forwards, independently of the arrays' own
    counter: the round trips, as the network sees them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def run(self, program: Any, inputs: Any, **kwargs: Any) -> Any:
        self.calls.append(("run", {"steps": len(program.steps), "inputs": inputs, **kwargs}))
        return self.client.run(program, inputs, **kwargs)

    def get(self, tensor: Any) -> Any:
        self.calls.append(("get", {}))
        return self.client.get(tensor)

    def put(self, array: Any) -> Any:
        self.calls.append(("put", {}))
        return self.client.put(array)


X = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)


def _workload(x: Any) -> tuple[Any, Any, Any]:
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    c = z.T @ z / x.shape[0]
    s = np.linalg.svd(c, compute_uv=False)
    spectrum = np.abs(np.fft.rfft(z, axis=0)).max(axis=1)
    return s, spectrum.argmax(), (np.exp(-(z**2)).sum() > 10)


def test_nothing_runs_until_a_value_is_asked_then_one_program(client: Client) -> None:
    counting = Counting(client)
    x = ta.asarray(counting, X)
    assert [name for name, _ in counting.calls] == ["put"]
    s, peak, flag = _workload(x)
    assert len(counting.calls) == 1  # a graph of 20 operations, nothing sent
    np.testing.assert_allclose(np.asarray(s), _workload(X)[0], rtol=1e-4)
    name, options = counting.calls[-1]
    assert name == "run" and options["keep"] is False and len(options["outputs"]) == 1
    assert int(peak) == int(_workload(X)[1])
    assert bool(flag) == bool(_workload(X)[2])
    assert [name for name, _ in counting.calls] == ["put", "run", "run", "run"]
    assert ta.round_trips(counting) == 4
    np.asarray(s), int(peak)  # asked again: already here
    assert len(counting.calls) == 4


def test_compute_brings_several_values_in_one_round_trip(client: Client) -> None:
    counting = Counting(client)
    x = ta.asarray(counting, X)
    s, peak, flag = ta.compute(*_workload(x))
    assert [name for name, _ in counting.calls] == ["put", "run"]
    assert len(counting.calls[-1][1]["outputs"]) == 3
    expected = _workload(X)
    np.testing.assert_allclose(s, expected[0], rtol=1e-4)
    assert peak == expected[1] and peak.dtype == np.intp
    assert flag == expected[2] and flag.dtype == np.bool_


def test_a_graph_past_the_program_limit_is_cut_not_refused(client: Client) -> None:
    counting = Counting(client)
    x = ta.asarray(counting, X[:4, :4])
    y, expected = x, X[:4, :4]
    for i in range(2 * MAX_PROGRAM_STEPS + 10):
        y, expected = y * 0.99 + i % 3, expected * np.float32(0.99) + i % 3
    assert y.dtype == expected.dtype == np.float32
    got = np.asarray(y)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    runs = [options for name, options in counting.calls if name == "run"]
    steps = 2 * (2 * MAX_PROGRAM_STEPS + 10)
    assert len(runs) == -(-steps // MAX_PROGRAM_STEPS)
    assert all(r["keep"] for r in runs[:-1]) and not runs[-1]["keep"]
    assert all(r["steps"] <= MAX_PROGRAM_STEPS for r in runs)


def test_persist_keeps_shared_intermediates_on_the_server(client: Client) -> None:
    counting = Counting(client)
    x = ta.asarray(counting, X)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    ta.persist(z)
    assert counting.calls[-1][0] == "run" and counting.calls[-1][1]["keep"] is True
    a, b = np.linalg.svd(z.T @ z, compute_uv=False), np.abs(z).max()
    for value in (a, b):
        np.asarray(value)
        assert counting.calls[-1][1]["steps"] <= 3  # z is an input now, not recomputed
    zn = (X - X.mean(axis=0)) / X.std(axis=0)
    np.testing.assert_allclose(np.asarray(a), np.linalg.svd(zn.T @ zn, compute_uv=False), rtol=1e-4)
    w = ta.asarray(counting, np.ones(16, np.float32))
    y = z @ w
    ta.persist(y)
    value, (grad,) = ta.grad((y**2).sum(), w)  # through y, not from its kept copy
    np.testing.assert_allclose(grad, 2 * zn.T @ (zn @ np.ones(16)), rtol=1e-3, atol=1e-3)


def test_local_arrays_in_operations_travel_once_per_program(client: Client) -> None:
    counting = Counting(client)
    x = ta.asarray(counting, X)
    shift = np.linspace(0, 1, X.size, dtype=np.float32).reshape(X.shape)  # 4 KiB
    y = ((x - shift) * (x + shift)).sum(axis=0) / shift.sum(axis=0)
    got = np.asarray(y)
    expected = ((X - shift) * (X + shift)).sum(axis=0) / shift.sum(axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got.dtype == expected.dtype
    inputs = counting.calls[-1][1]["inputs"]
    assert sum(1 for v in inputs.values() if v is shift) == 1  # one input, used by 2 steps


def test_scalars_and_truth_values(client: Client) -> None:
    x = ta.asarray(client, np.arange(6, dtype=np.int64))
    if x.sum() > 10:  # a comparison used in `if`
        total = int(x.sum())
    assert total == 15
    assert float(x.mean()) == 2.5
    assert complex(x[1]) == 1 + 0j
    assert f"{x.max():d}" == "5"
    assert repr(x) == "RemoteArray([0, 1, 2, 3, 4, 5])"
    with pytest.raises(ValueError, match="ambiguous"):
        bool(x > 2)
    assert list(range(6))[x[2]] == 2  # __index__


def test_gradients_through_the_graph(client: Client) -> None:
    rng = np.random.default_rng(2)
    a, w0 = rng.standard_normal((8, 3)), rng.standard_normal(3)
    x, w = ta.asarray(client, a), ta.asarray(client, w0)
    loss = np.sum(np.tanh(x @ w) ** 2) / 8 + 0.1 * np.linalg.norm(w) ** 2
    value, (grad_w, grad_x) = ta.grad(loss, w, x)
    t = np.tanh(a @ w0)
    expected_w = a.T @ (2 * t * (1 - t**2)) / 8 + 0.2 * w0
    np.testing.assert_allclose(value, np.sum(t**2) / 8 + 0.1 * np.sum(w0**2), rtol=1e-10)
    np.testing.assert_allclose(grad_w, expected_w, rtol=1e-8)
    assert grad_x.shape == a.shape and grad_x.dtype == np.float64
    with pytest.raises(ValueError, match="scalar"):
        ta.grad(x @ w, w)
    with pytest.raises(ValueError, match="computed"):
        ta.grad(loss, x @ w)


def test_unsupported_raises_naming_the_function_and_computes_nothing(client: Client) -> None:
    counting = Counting(client)
    x = ta.asarray(counting, X)
    cases = [
        (lambda: np.cumsum(x), "numpy.cumsum"),
        (lambda: np.add.accumulate(x), "numpy.add.accumulate"),
        (lambda: np.bitwise_and(x.astype(np.int32), 1), "numpy.bitwise_and"),
        (lambda: np.add(x, 1, out=np.empty(X.shape)), "'out'"),
        (lambda: x[x > 0], "advanced"),
        (lambda: x[[0, 1]], "advanced"),
        (lambda: np.linalg.eigh(x), "numpy.linalg.eigh"),
        (lambda: np.sum(x, where=X > 0), "where"),
        (lambda: np.einsum("...i->i", x), r"'\.\.\.'"),
    ]
    for make, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            make()
    with pytest.raises(TypeError, match="immutable"):
        x[0] = 1
    with pytest.raises(IndexError):
        x[64]
    with pytest.raises(ValueError, match="broadcast"):
        x + np.ones(3)
    assert [name for name, _ in counting.calls] == ["put"]


def test_server_errors_come_back_clearly(client: Client) -> None:
    x = ta.asarray(client, np.arange(4, dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match=r"numpy\.apply"):
        np.asarray(x // 0)  # NumPy gives 0 with a warning; torch refuses integer division by 0
    assert int((x + 1).sum()) == 10  # the server and the session go on


def test_arrays_of_different_clients_do_not_mix(client: Client, address: str) -> None:
    with Client(address, timeout=60) as other:
        a, b = ta.asarray(client, X), ta.asarray(other, X)
        with pytest.raises(ValueError, match="different clients"):
            a + b


def test_async_client_awaits_values(address: str) -> None:
    async def main() -> tuple[Any, ...]:
        async with AsyncClient(address, timeout=60) as ac:
            x = ta.asarray(await ac.put(X))
            with pytest.raises(TypeError, match="asarray_async"):
                ta.asarray(ac, X)
            y = await ta.asarray_async(ac, X)
            assert float(await (x - y).max()) == 0.0
            s, peak, flag = _workload(x)
            with pytest.raises(TypeError, match="await"):
                np.asarray(s)
            first = await s
            await ta.persist_async(peak)
            rest = await ta.compute_async(peak, flag)
            w = ta.constant(ac, np.ones(16, np.float32))
            value, (grad,) = await ta.grad_async(((x @ w) ** 2).sum(), w)
            return first, *rest, value, grad, ta.round_trips(ac)

    s, peak, flag, value, grad, trips = asyncio.run(main())
    expected = _workload(X)
    np.testing.assert_allclose(s, expected[0], rtol=1e-4)
    assert peak == expected[1] and flag == expected[2]
    np.testing.assert_allclose(grad, 2 * X.T @ (X @ np.ones(16, np.float32)), rtol=1e-4)
    assert value.dtype == np.float32
    assert trips == 6  # asarray_async, the max, s, persist, compute, grad
