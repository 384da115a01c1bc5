"""The model-serving surface of both clients against real servers: version pinning,
model statistics, the new ModelInfo fields, and Load/Unload under explicit control.

Statistics are checked on a server of this module's own (built-in models only), so
that the counts come from these tests alone; Load/Unload each get a fresh server
over a fresh repository (tests/support/repo_fixtures.py), since they change what it serves.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start
from support.repo_fixtures import (
    expected_regressor,
    expected_scaler,
    make_broken_model,
    make_repository,
)

import tensorwire
from tensorwire import (
    AsyncClient,
    Client,
    DynamicBatching,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelInfo,
    ModelVersion,
    NotFoundError,
    UnavailableError,
    VersionStatistics,
)
from tensorwire._transport.methods import METHODS
from tensorwire_server.settings import Settings

NEW_METHODS = ("model_statistics", "load_model", "unload_model")
X = np.arange(12, dtype=np.float32).reshape(3, 4)  # scaler's and regressor's input
MLP_X = np.ones((3, 16), np.float32)


@pytest.fixture(scope="module")
def builtins_address() -> Iterator[str]:
    """A CPU server with the built-in models only and no model control."""
    yield from start(Settings(host="127.0.0.1", port=0, device="cpu"))


@pytest.fixture
def repo_address(tmp_path: Path) -> Iterator[str]:
    """A CPU server over a fresh repository (scaler, regressor, broken) that loads
    and unloads models on request."""
    make_repository(tmp_path)
    make_broken_model(tmp_path)
    yield from start(
        Settings(
            host="127.0.0.1",
            port=0,
            device="cpu",
            builtins=False,
            model_repo=str(tmp_path),
            model_control="explicit",
        )
    )


def scaled(version: int) -> np.ndarray:
    """What the scaler's ``version`` returns for X."""
    return expected_scaler(version, torch.from_numpy(X)).numpy()


def regressed(version: int) -> np.ndarray:
    """What the regressor's ``version`` returns for X."""
    return expected_regressor(version, torch.from_numpy(X)).detach().numpy()


def stats_of(client: Client, model: str, version: int = 1) -> VersionStatistics:
    (stats,) = client.model_statistics(model, version)
    return stats


def ready_versions(info: ModelInfo) -> tuple[int, ...]:
    return tuple(v.version for v in info.versions if v.state == "READY")


# ---------------------------------------------------------------------- the API


def test_new_methods_and_types_are_public_and_twinned() -> None:
    for name in ("DynamicBatching", "ModelVersion", "VersionStatistics"):
        assert name in tensorwire.__all__
    for name in NEW_METHODS:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name))
        assert inspect.signature(getattr(Client, name)) == inspect.signature(
            getattr(AsyncClient, name)
        )
    for name in ("infer", "grad"):
        version = inspect.signature(getattr(Client, name)).parameters["version"]
        assert version.kind is inspect.Parameter.KEYWORD_ONLY and version.default == 0
    # Admin actions are never repeated by the client; statistics are a plain read.
    assert METHODS["ModelStatistics"].idempotent and not METHODS["ModelStatistics"].streamed
    assert not METHODS["Load"].idempotent and not METHODS["Load"].streamed
    assert not METHODS["Unload"].idempotent and not METHODS["Unload"].streamed


def test_model_info_keeps_its_old_constructor() -> None:
    info = ModelInfo("m", "builtin", "", (), (), False, 0)
    assert info.state == "READY" and info.versions == () and info.dynamic_batching is None
    assert info.max_batch_size == 0 and info.instances == () and info.max_queue_size == 0


def test_a_bad_version_is_refused_before_sending() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", retries=0) as c:  # nothing listens there
        for bad in (-1, 1 << 63, 1.0, True):
            with pytest.raises(InvalidArgumentError, match="version"):
                c.infer("mlp", MLP_X, version=bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError, match="version"):
                c.unload_model("mlp", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="version"):
            c.grad("mlp", MLP_X, version=-2)
        with pytest.raises(InvalidArgumentError, match="version"):
            c.model_statistics("mlp", -1)


def test_load_and_unload_are_not_retried_when_no_server_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    with Client(target, retries=2, timeout=30) as c:
        with pytest.raises(UnavailableError) as exc:
            c.model_statistics()
        assert "(after 3 attempts)" in str(exc.value)
        for call in (lambda: c.load_model("scaler"), lambda: c.unload_model("scaler")):
            with pytest.raises(UnavailableError) as exc:
                call()
            assert "attempts" not in str(exc.value)


# ---------------------------------------------------------------------- built-ins


def test_version_pinning_on_builtins(builtins_address: str) -> None:
    with Client(builtins_address, timeout=60) as c:
        want = c.infer("mlp", MLP_X)["output"]
        np.testing.assert_array_equal(c.infer("mlp", MLP_X, version=1)["output"], want)
        with pytest.raises(NotFoundError, match="version 2"):
            c.infer("mlp", MLP_X, version=2)
        g = np.ones((3, 4), np.float32)
        pinned = c.grad("mlp", MLP_X, grad_outputs=g, version=1)
        np.testing.assert_array_equal(pinned.outputs["output"], want)
        assert pinned.grads["input"].shape == (3, 16)
        with pytest.raises(NotFoundError, match="version 2"):
            c.grad("mlp", MLP_X, grad_outputs=g, version=2)


def test_model_statistics_count_requests_executions_and_batch_sizes(
    builtins_address: str,
) -> None:
    with Client(builtins_address, timeout=60) as c:
        before = stats_of(c, "mlp")
        assert before.model == "mlp" and before.version == 1
        for _ in range(4):  # one after the other: each runs as its own forward pass
            c.infer("mlp", MLP_X)
        after = stats_of(c, "mlp")
        assert after.requests == before.requests + 4
        assert after.inferences == before.inferences + 12
        assert after.executions == before.executions + 4
        assert after.batch_sizes.get(3, 0) == before.batch_sizes.get(3, 0) + 4
        assert after.compute_seconds > before.compute_seconds
        assert after.queue_seconds >= before.queue_seconds
        assert after.failures == before.failures

        c.grad("mlp", MLP_X, grad_outputs=np.ones((3, 4), np.float32))
        assert stats_of(c, "mlp").requests == after.requests + 1

        every = c.model_statistics()
        assert [(s.model, s.version) for s in every] == [
            ("echo", 1),
            ("identity", 1),
            ("mlp", 1),
            ("mlp64", 1),
        ]
        assert all(isinstance(s, VersionStatistics) for s in every)
        with pytest.raises(NotFoundError):
            c.model_statistics("mlp", 2)
        with pytest.raises(NotFoundError):
            c.model_statistics("no_such_model")


def test_info_shows_how_the_builtin_mlp_serves(builtins_address: str) -> None:
    with Client(builtins_address, timeout=60) as c:
        c.infer("mlp", MLP_X)
        models = c.info().models
    mlp = models["mlp"]
    assert mlp.state == "READY" and mlp.reason == ""
    assert mlp.max_batch_size == 1024
    assert isinstance(mlp.dynamic_batching, DynamicBatching)
    assert mlp.dynamic_batching.max_queue_delay >= 0
    assert mlp.instances == ("cpu",) and mlp.precision == "float32"
    assert mlp.max_queue_size > 0
    assert ready_versions(mlp) == (1,)
    (version,) = mlp.versions
    assert isinstance(version, ModelVersion)
    assert version.statistics is not None and version.statistics.model == "mlp"
    assert version.statistics.requests >= 1
    identity = models["identity"]
    assert identity.max_batch_size == 0 and identity.dynamic_batching is None


def test_async_client_pins_versions_and_reads_statistics(builtins_address: str) -> None:
    async def run() -> tuple[list[VersionStatistics], list[VersionStatistics]]:
        async with AsyncClient(builtins_address, timeout=60) as ac:
            before = await ac.model_statistics("mlp64")
            x = np.ones((2, 16))
            await asyncio.gather(*(ac.infer("mlp64", x, version=1) for _ in range(3)))
            await ac.grad("mlp64", x, grad_outputs=np.ones((2, 4)), version=1)
            with pytest.raises(NotFoundError):
                await ac.infer("mlp64", x, version=2)
            with pytest.raises(NotFoundError):
                await ac.grad("mlp64", x, grad_outputs=np.ones((2, 4)), version=2)
            with pytest.raises(NotFoundError):
                await ac.model_statistics("mlp64", 2)
            info = (await ac.info()).models["mlp64"]
            assert info.max_batch_size == 1024 and ready_versions(info) == (1,)
            return before, await ac.model_statistics("mlp64", 1)

    (before,), (after,) = asyncio.run(run())
    assert after.requests == before.requests + 4  # version 2 never ran: not counted
    assert after.inferences == before.inferences + 8
    assert before.executions < after.executions <= before.executions + 4
    assert sum(after.batch_sizes.values()) == after.executions


def test_load_and_unload_need_explicit_model_control(builtins_address: str) -> None:
    with Client(builtins_address, timeout=60) as c:
        with pytest.raises(FailedPreconditionError, match="explicit"):
            c.load_model("mlp")
        with pytest.raises(FailedPreconditionError, match="explicit"):
            c.unload_model("mlp")
        assert ready_versions(c.info().models["mlp"]) == (1,)

    async def run() -> None:
        async with AsyncClient(builtins_address, timeout=60) as ac:
            with pytest.raises(FailedPreconditionError):
                await ac.load_model("mlp")
            with pytest.raises(FailedPreconditionError):
                await ac.unload_model("mlp", 1)

    asyncio.run(run())


# ---------------------------------------------------------------------- Load, Unload


def test_unload_a_version_then_load_the_model_again(repo_address: str) -> None:
    with Client(repo_address, timeout=120) as c:
        np.testing.assert_array_equal(c.infer("scaler", X, version=2)["output"], scaled(2))
        assert c.unload_model("scaler", 2) is None
        with pytest.raises(NotFoundError):
            c.infer("scaler", X, version=2)
        with pytest.raises(NotFoundError):
            c.unload_model("scaler", 2)  # already gone
        # The newest serving version is now 1.
        np.testing.assert_array_equal(c.infer("scaler", X)["output"], scaled(1))
        assert ready_versions(c.info().models["scaler"]) == (1,)

        info = c.load_model("scaler")
        assert isinstance(info, ModelInfo) and info.name == "scaler"
        assert info.state == "READY" and ready_versions(info) == (2, 1)
        assert info.max_batch_size == 32
        assert info.dynamic_batching == DynamicBatching(0.001, ())
        np.testing.assert_array_equal(c.infer("scaler", X, version=2)["output"], scaled(2))
        assert [s.version for s in c.model_statistics("scaler")] == [2, 1]


def test_unload_a_whole_model_then_load_it_again(repo_address: str) -> None:
    with Client(repo_address, timeout=120) as c:
        np.testing.assert_allclose(c.infer("regressor", X)["output"], regressed(2))
        c.unload_model("regressor")
        with pytest.raises(NotFoundError):
            c.infer("regressor", X)
        with pytest.raises(NotFoundError):
            c.unload_model("regressor")
        info = c.load_model("regressor")
        assert ready_versions(info) == (2, 1) and info.max_batch_size == 8
        assert info.dynamic_batching is None
        np.testing.assert_allclose(c.infer("regressor", X, version=1)["output"], regressed(1))
        with pytest.raises(NotFoundError):
            c.load_model("no_such_model")
        with pytest.raises(InvalidArgumentError, match="broken"):
            c.load_model("broken")
        broken = c.info().models["broken"]
        assert broken.state == "FAILED" and broken.reason
        assert [(v.version, v.state) for v in broken.versions] == [(1, "FAILED")]


def test_async_client_unloads_and_loads(repo_address: str) -> None:
    async def run() -> ModelInfo:
        async with AsyncClient(repo_address, timeout=120) as ac:
            await ac.unload_model("scaler", 1)
            with pytest.raises(NotFoundError):
                await ac.infer("scaler", X, version=1)
            with pytest.raises(NotFoundError):
                await ac.grad("scaler", X, grad_outputs=np.ones_like(X), version=1)
            np.testing.assert_array_equal((await ac.infer("scaler", X))["output"], scaled(2))
            info = await ac.load_model("scaler")
            out = await ac.infer("scaler", X, version=1)
            np.testing.assert_array_equal(out["output"], scaled(1))
            (stats,) = await ac.model_statistics("scaler", 1)
            assert stats.requests == 1 and stats.executions == 1
            return info

    info = asyncio.run(run())
    assert ready_versions(info) == (2, 1)
