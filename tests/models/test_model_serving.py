"""A server over a model repository: every format and version loads, versions are pinned
or newest, a broken model is reported while the rest serve, --strict refuses to start,
and models load and unload while clients keep sending."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start
from support.repo_fixtures import (
    EXAMPLE_REPOSITORY,
    expected_scaler,
    make_broken_model,
    make_repository,
)
from support.repo_fixtures import expected_regressor as _expected_regressor
from support.servers import server_argv

import tensorwire as tw
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(180)

serving = contextmanager(start)

X = np.arange(12, dtype=np.float32).reshape(3, 4)


def expected_regressor(version: int, x: np.ndarray) -> np.ndarray:
    return _expected_regressor(version, torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repository(tmp_path_factory.mktemp("repo"))
    make_broken_model(root)
    return root


@pytest.fixture(scope="module")
def address(repository: Path) -> Iterator[str]:
    yield from start(Settings(port=0, device="cpu", model_repo=str(repository)))


def test_every_model_and_version_loads_and_the_broken_one_is_reported(address: str) -> None:
    with tw.Client(address, timeout=30) as client:
        models = client.info().models
    assert models["scaler"].state == "READY"
    assert [v.version for v in models["scaler"].versions] == [2, 1]
    assert models["scaler"].kind == "export"  # the newest: version 2
    assert [v.version for v in models["regressor"].versions] == [2, 1]
    assert models["regressor"].kind == "safetensors"
    broken = models["broken"]
    assert broken.state == "FAILED"
    assert "model.pt" in broken.reason
    assert [(v.version, v.state) for v in broken.versions] == [(1, "FAILED")]
    assert "mlp" in models  # the built-ins serve beside the repository


@pytest.mark.parametrize(
    "name,expected", [("scaler", expected_scaler), ("regressor", expected_regressor)]
)
def test_versions_can_be_pinned_and_the_newest_serves_by_default(
    address: str, name: str, expected: object
) -> None:
    with tw.Client(address, timeout=30) as client:
        for version in (1, 2):
            got = client.infer(name, X, version=version)["output"]
            np.testing.assert_array_equal(got, expected(version, X))  # type: ignore[operator]
        np.testing.assert_array_equal(client.infer(name, X)["output"], expected(2, X))  # type: ignore[operator]
        with pytest.raises(tw.NotFoundError, match="no version 3"):
            client.infer(name, X, version=3)


def test_a_broken_model_answers_not_found_with_its_reason(address: str) -> None:
    with tw.Client(address, timeout=30) as client, pytest.raises(tw.NotFoundError) as caught:
        client.infer("broken", X)
    assert "not serving" in str(caught.value) and "model.pt" in str(caught.value)


def test_statistics_per_version(address: str) -> None:
    with tw.Client(address, timeout=30) as client:
        before = {s.version: s.requests for s in client.model_statistics("scaler")}
        client.infer("scaler", X, version=1)
        client.infer("scaler", X, version=1)
        with pytest.raises(tw.InvalidArgumentError):
            client.infer("scaler", np.zeros((2, 5), np.float32), version=1)
        after = {s.version: s for s in client.model_statistics("scaler", version=1)}
    assert list(after) == [1]
    assert after[1].requests >= before[1] + 2
    assert after[1].inferences >= 6 and after[1].batch_sizes


def test_strict_refuses_to_start_with_a_broken_model(repository: Path) -> None:
    proc = subprocess.run(
        server_argv("--port", "0", "--device", "cpu", "--model-repo", str(repository), "--strict"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "broken" in proc.stderr and "strict" in proc.stderr


def test_the_example_repository_serves(tmp_path: Path) -> None:
    settings = Settings(port=0, device="cpu", model_repo=str(EXAMPLE_REPOSITORY))
    with serving(settings) as address, tw.Client(address, timeout=30) as client:
        models = client.info().models
        assert models["scaler"].state == models["regressor"].state == "READY"
        x = np.ones((2, 4), np.float32)
        assert client.infer("scaler", x)["output"].shape == (2, 4)
        assert client.infer("regressor", x)["output"].shape == (2, 2)


# ------------------------------------------------------------ load and unload while serving


def test_load_and_unload_while_clients_send(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    settings = Settings(port=0, device="cpu", model_repo=str(root), model_control="explicit")
    with serving(settings) as address:
        stop = threading.Event()
        unloaded = threading.Event()
        failures: list[str] = []
        counts = {"ok": 0, "gone": 0}

        def send(version: int) -> None:
            with tw.Client(address, timeout=30) as client:
                while not stop.is_set():
                    try:
                        got = client.infer("scaler", X, version=version)["output"]
                        want = expected_scaler(version or 2, X)
                        if version == 0:  # newest: 2, or 1 once 2 is gone
                            assert np.array_equal(got, want) or np.array_equal(
                                got, expected_scaler(1, X)
                            )
                        else:
                            assert np.array_equal(got, want)
                        counts["ok"] += 1
                    except tw.NotFoundError as exc:
                        # Only version 2 goes, and only after its unload began.
                        if version == 2 and unloaded.is_set():
                            counts["gone"] += 1
                        else:
                            failures.append(f"version {version}: {exc}")
                    except Exception as exc:
                        failures.append(f"version {version}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=send, args=(v,)) for v in (0, 1, 2, 0, 1)]
        for thread in threads:
            thread.start()
        with tw.Client(address, timeout=60) as admin:
            time.sleep(0.5)
            admin.load_model("scaler")  # replace every version while requests run
            time.sleep(0.5)
            unloaded.set()
            admin.unload_model("scaler", version=2)
            time.sleep(0.5)
            info = admin.info().models["scaler"]
            admin.load_model("regressor")
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not failures, failures[:5]
        assert counts["ok"] > 0 and counts["gone"] > 0
        assert [v.version for v in info.versions] == [1]


def test_unloading_waits_for_requests_in_flight(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    settings = Settings(port=0, device="cpu", model_repo=str(root), model_control="explicit")
    with serving(settings) as address, tw.Client(address, timeout=60) as client:
        assert client.unload_model("regressor") is None
        with pytest.raises(tw.NotFoundError):
            client.infer("regressor", X)
        with pytest.raises(tw.NotFoundError, match="not loaded"):
            client.unload_model("regressor")
        with pytest.raises(tw.NotFoundError, match="no model"):
            client.load_model("nonexistent")
        info = client.load_model("regressor")
        assert info.state == "READY"
        np.testing.assert_array_equal(
            client.infer("regressor", X)["output"], expected_regressor(2, X)
        )


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    settings = Settings(port=0, device="cpu", model_repo=str(root), model_control="explicit")
    with serving(settings) as address:
        (root / "scaler" / "2" / "model.pt2").write_bytes(b"not a model")
        with tw.Client(address, timeout=60) as client:
            with pytest.raises(tw.InvalidArgumentError, match="did not load"):
                client.load_model("scaler")
            np.testing.assert_array_equal(
                client.infer("scaler", X)["output"], expected_scaler(2, X)
            )


def test_load_and_unload_need_explicit_model_control(address: str) -> None:
    with tw.Client(address, timeout=30) as client:
        with pytest.raises(tw.FailedPreconditionError, match="model-control explicit"):
            client.load_model("scaler")
        with pytest.raises(tw.FailedPreconditionError):
            client.unload_model("scaler")
