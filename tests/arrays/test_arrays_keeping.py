"""Values asked for one at a time reuse what they share: the Run that computes a value
also keeps, in the same round trip, the intermediates other live arrays still need
(an SVD several results read), and lets them go once nothing needs them; the session
never holds more than the live arrays need."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import start

import tensorwire.arrays as ta
from tensorwire import AsyncClient, Client
from tensorwire.arrays.graph import MAX_PROGRAM_STEPS
from tensorwire_server.settings import Settings

X = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    """A server whose sessions hold 4 KiB at most."""
    yield from start(Settings(host="127.0.0.1", port=0, device="cpu", session_quota_bytes=4096))


class Recording:
    """A client that records each Run it forwards: the functions its steps apply and
    the refs it keeps; other calls are counted too."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.calls: list[tuple[str, list[str], list[str]]] = []

    def run(self, program: Any, inputs: Any, **kwargs: Any) -> Any:
        applied = [str(s.args[0]) if s.args else s.function for s in program.calls]
        self.calls.append(("run", applied, list(kwargs.get("kept") or ())))
        return self.client.run(program, inputs, **kwargs)

    def get(self, tensor: Any) -> Any:
        self.calls.append(("get", [], []))
        return self.client.get(tensor)

    def put(self, array: Any) -> Any:
        self.calls.append(("put", [], []))
        return self.client.put(array)


def _results(x: Any) -> list[Any]:
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    _, s, vh = np.linalg.svd(z.T @ z)
    return [s[:3] / s.sum(), (z @ vh[:2].T).std(axis=0), np.abs(z).max(), (s**2).sum()]


def test_each_value_alone_computes_the_shared_svd_once(client: Client) -> None:
    recording = Recording(client)
    x = ta.asarray(recording, X)
    results = _results(x)
    frees: list[list[str]] = []
    flush = client._session.free

    def spy(session: object, ids: list[str], timeout: object) -> object:  # counts Free calls
        frees.append(ids)
        return flush(session, ids, timeout)  # type: ignore[arg-type]

    client._session.free = spy  # type: ignore[method-assign,assignment]
    values = [np.asarray(r) for r in results]  # as a NumPy user prints them
    assert frees == []  # what was let go of went with the next Run, no Free of its own
    for got, want in zip(values, _results(X), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    runs = recording.calls[1:]
    assert [name for name, _, _ in runs] == ["run"] * 4  # one round trip per value
    svds = [applied.count("linalg.svd") for _, applied, _ in runs]
    assert svds == [1, 0, 0, 0]  # computed by the first, kept for the others
    assert runs[0][2]  # it kept what the other three read, in the same call
    ctx = results[0]._ctx
    assert ctx.liveness.held() == 0  # every value is here: nothing is kept for them
    gc.collect()
    info = client.session_info()  # frees what was let go first
    assert [h.id for h in info.handles] == [x._use.node.tensor.handle.id]


def test_intermediates_a_live_array_needs_stay_until_it_is_computed(client: Client) -> None:
    x = ta.asarray(client, X)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    first, later = np.abs(z).max(), (z**2).sum(axis=0)
    np.asarray(first)
    ctx = x._ctx
    assert ctx.liveness.held() == 1  # z, which `later` reads
    del later
    np.asarray(z.sum())  # z itself is live: it stays for it
    assert ctx.liveness.held() == 1
    del z
    np.asarray(x.sum())  # the next value lets go of what nothing live needs
    assert ctx.liveness.held() == 0


def test_the_session_stays_bounded_over_many_rounds(client: Client) -> None:
    x = ta.asarray(client, X)
    for _ in range(25):
        results = _results(x)
        for r in results[:2]:  # half of them looked at, half dropped unasked
            np.asarray(r)
        assert x._ctx.liveness.held() <= 3
        del results, r
    gc.collect()
    np.asarray(x.sum())
    gc.collect()
    assert len(client.session_info().handles) == 1  # x alone


def test_past_the_quota_the_value_comes_without_what_it_would_keep(limited: str) -> None:
    with Client(limited, timeout=60) as client:
        x = ta.asarray(client, np.arange(300.0))  # 2400 of the session's 4096 bytes
        y = x * 2  # 2400 more: over the quota if kept
        a, b = y.sum(), y.max()
        assert float(a) == 2 * np.arange(300.0).sum()  # kept nothing, then ran again
        assert x._ctx.liveness.held() == 0 and x._ctx.round_trips == 3
        assert float(b) == 598.0
        assert len(client.session_info().handles) == 1


def test_a_cut_graph_keeps_its_pieces_results_only_while_needed(client: Client) -> None:
    x = ta.asarray(client, X[:4, :4])
    y = x
    for i in range(MAX_PROGRAM_STEPS + 10):
        y = y * 0.99 + i % 3
    other = y.sum()
    np.asarray(y[0])
    assert x._ctx.liveness.held() >= 1  # y, which `other` reads
    np.testing.assert_allclose(float(other), float(np.asarray(y).sum()), rtol=1e-5)
    del other, y
    np.asarray(x.sum())
    assert x._ctx.liveness.held() == 0


def test_an_async_clients_values_share_work_too(address: str) -> None:
    async def main() -> list[np.ndarray]:
        async with AsyncClient(address, timeout=60) as ac:
            x = await ta.asarray_async(ac, X)
            results = _results(x)
            ctx = x._ctx
            values = [await results[0]]
            assert ctx.liveness.held() == 3  # z, s and vh, which the other three read
            values += [await r for r in results[1:]]
            assert ctx.round_trips == 5 and ctx.liveness.held() == 0
            return values

    values = asyncio.run(main())
    for got, want in zip(values, _results(X), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
