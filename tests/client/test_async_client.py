"""AsyncClient: the same methods as Client, and the same results."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest

from tensorwire import AsyncClient, Client, DeadlineExceededError, NotFoundError

PUBLIC = [
    "info",
    "infer",
    "grad",
    "call",
    "call_grad",
    "close",
    "put",
    "free",
    "session_info",
    "run",
    "trainer",
]


def _sync_spelling(signature: inspect.Signature) -> str:
    """A signature with the async remote types named as their sync twins."""
    return (
        str(signature)
        .replace("AsyncRemoteTensor", "RemoteTensor")
        .replace("AsyncTrainer", "Trainer")
    )


def test_twins_have_the_same_methods_and_signatures() -> None:
    sync_methods = {n for n in dir(Client) if not n.startswith("_")}
    async_methods = {n for n in dir(AsyncClient) if not n.startswith("_")}
    assert sync_methods == async_methods
    for name in PUBLIC:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name))
        # The same but for the remote results: AsyncClient's are AsyncRemoteTensors.
        assert str(inspect.signature(getattr(Client, name))) == _sync_spelling(
            inspect.signature(getattr(AsyncClient, name))
        )


def test_sync_and_async_results_are_identical(client: Client, address: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 16))
    a = rng.standard_normal((5, 5)) + 5 * np.eye(5)
    big = rng.standard_normal((300, 300))

    async def run() -> list[object]:
        async with AsyncClient(address, timeout=60) as ac:
            # Concurrent calls on one channel.
            return list(
                await asyncio.gather(
                    ac.infer("mlp64", x),
                    ac.grad("mlp64", x, grad_outputs=np.ones((4, 4)), param_grads=True),
                    ac.call("linalg.svd", a),
                    ac.call_grad("linalg.det", a),
                    ac.infer("identity", big),
                )
            )

    got = asyncio.run(run())
    want = [
        client.infer("mlp64", x),
        client.grad("mlp64", x, grad_outputs=np.ones((4, 4)), param_grads=True),
        client.call("linalg.svd", a),
        client.call_grad("linalg.det", a),
        client.infer("identity", big),
    ]
    assert repr(got) == repr(want)
    assert asyncio.run(_info(address)) == client.info().models


async def _info(address: str) -> object:
    async with AsyncClient(address) as ac:
        return (await ac.info()).models


def test_async_errors_and_deadlines_map_like_sync(address: str) -> None:
    async def run() -> None:
        async with AsyncClient(address, timeout=0.3) as ac:
            with pytest.raises(NotFoundError, match="model 'nope' not found"):
                await ac.infer("nope", np.ones(1))
            with pytest.raises(DeadlineExceededError):
                await ac.infer("sleeper", np.array(2.0))
        with pytest.raises(RuntimeError, match="closed"):
            await ac.info()

    asyncio.run(run())
