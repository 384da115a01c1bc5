"""Compiled models through a real server: an AOTInductor package and a torch.compile'd
model (examples/make_compiled_repo.py, small), a --model package and a --model factory
compiled by --model-compile, beside the test repository's eager, exported and
TorchScript versions. Each compiles once, in the module's server's warm-up."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start
from support.compiled_fixtures import (
    FEATURES,
    MAX_BATCH,
    MIXER_AOTI_PACKAGE,
    build_compiled_repository,
    mixer_grads,
)

import tensorwire as tw
from tensorwire.cli.display import format_info
from tensorwire.errors import FailedPreconditionError
from tensorwire_server.engine.engine import Engine
from tensorwire_server.models.aotinductor import AOTInductorModule, _call_spec_inputs, file_format
from tensorwire_server.models.config import Compilation, ConfigError, ModelConfig, read_config
from tensorwire_server.models.loader import load_model, load_version
from tensorwire_server.models.model import IOSpec
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("compiled") / "repo"
    yield build_compiled_repository(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def address(repository: tuple[Path, torch.nn.Module]) -> Iterator[str]:
    root, _ = repository
    settings = Settings(
        port=0,
        device="cpu",
        builtins=False,
        model_repo=str(root),
        models={
            "packed": str(root / "mixer_aoti" / "1" / MIXER_AOTI_PACKAGE),
            "two_heads": "support.toy_models:two_heads",
        },
        model_compile="default",
    )
    with contextmanager(start)(settings) as address:
        yield address


@pytest.fixture
def client(address: str) -> Iterator[tw.Client]:
    with tw.Client(address, timeout=120) as c:
        yield c


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEATURES)).astype(np.float32)


def eager(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


def test_info_says_how_each_model_runs(client: tw.Client) -> None:
    models = client.info().models
    runs = {name: (m.kind, m.execution) for name, m in models.items() if m.state == "READY"}
    assert runs == {
        "mixer": ("safetensors", "compiled"),
        "mixer_aoti": ("aotinductor", "aotinductor"),
        "packed": ("aotinductor", "aotinductor"),
        "scaler": ("export", "exported"),  # its newest version; version 1 is TorchScript
        "regressor": ("safetensors", "eager"),
        "two_heads": ("python", "compiled"),
        "fallback": ("safetensors", "eager"),
    }
    mixer = models["mixer"]
    assert mixer.compiled_graphs >= 2  # one row and several; forward and backward
    assert mixer.recompilations == 0
    # The package's own signature, read from its metadata (--model has no model.toml).
    packed = models["packed"]
    assert [(s.name, s.dtype, s.shape) for s in packed.inputs] == [
        ("input", "float32", (-1, FEATURES))
    ]
    assert [s.name for s in packed.outputs] == ["output"]
    # `tensorwire info` says it too.
    shown = format_info(client.info(), "here")
    assert f"safetensors, runs compiled ({mixer.compiled_graphs} graphs in warm-up, 0 " in shown
    assert "aotinductor, runs aotinductor: " in shown
    assert "export, runs exported: " in shown


def test_compile_failures_fall_back_or_fail_as_configured(client: tw.Client) -> None:
    models = client.info().models
    fallback = models["fallback"]
    assert fallback.execution == "eager"
    assert "torch.compile (default) failed: ConstraintViolationError" in fallback.description
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(client.infer("fallback", {"x": x})["output"], x.reshape(2, 4) * 2)
    strict = models["strict"]
    assert strict.state == "FAILED"
    assert "torch.compile (default) failed: ConstraintViolationError" in strict.reason
    cudagraphs = models["cudagraphs"]
    assert cudagraphs.state == "FAILED"
    assert "reduce-overhead records CUDA graphs, which run on CUDA only" in cudagraphs.reason
    assert "on cpu" in cudagraphs.reason


@pytest.mark.parametrize("name", ["mixer", "mixer_aoti", "packed"])
def test_every_batch_size_computes_what_eager_does(
    client: tw.Client, repository: tuple[Path, torch.nn.Module], name: str
) -> None:
    _, module = repository
    for n in (1, 2, 3, 7, MAX_BATCH):
        x = rows(n, seed=n)
        out = client.infer(name, {"input": x})["output"]
        np.testing.assert_allclose(out, eager(module, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mixer", "mixer_aoti"])
def test_dynamic_batching_over_32_callers_compiles_nothing_more(
    address: str, repository: tuple[Path, torch.nn.Module], name: str
) -> None:
    _, module = repository
    with tw.Client(address) as c:
        before = c.info().models[name]
        (ran_before,) = c.model_statistics(name)
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            with tw.Client(address, timeout=120) as c:
                for j in range(6):
                    x = rows(1 + (i + j) % 3, seed=i * 10 + j)
                    out = c.infer(name, {"input": x})["output"]
                    np.testing.assert_allclose(out, eager(module, x), rtol=1e-4, atol=1e-5)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors[0]
    with tw.Client(address) as c:
        after = c.info().models[name]
        (ran_after,) = c.model_statistics(name)
    assert after.recompilations == before.recompilations == 0
    assert after.compiled_graphs == before.compiled_graphs
    # Requests were batched together: fewer forward passes than requests.
    requests = ran_after.requests - ran_before.requests
    assert requests == 32 * 6
    assert ran_after.executions - ran_before.executions < requests


def test_grad_through_a_compiled_model_matches_eager_autograd(
    client: tw.Client, repository: tuple[Path, torch.nn.Module]
) -> None:
    _, module = repository
    x = rows(5, seed=3)
    seed = np.random.default_rng(4).standard_normal((5, FEATURES)).astype(np.float32)
    result = client.grad("mixer", {"input": x}, grad_outputs={"output": seed}, param_grads=True)
    want_input, want_params = mixer_grads(module, x, seed)
    np.testing.assert_allclose(result.grads["input"], want_input, rtol=1e-4, atol=1e-5)
    assert set(result.param_grads) == set(want_params)
    for name, grad in want_params.items():
        np.testing.assert_allclose(result.param_grads[name], grad, rtol=1e-4, atol=1e-4)
    assert client.info().models["mixer"].recompilations == 0


def test_training_a_compiled_model_trains_a_copy(client: tw.Client) -> None:
    x = rows(16, seed=5)
    target = np.tanh(x)
    before = client.infer("mixer", {"input": x})["output"]
    with client.trainer("mixer", optimizer="sgd", lr=0.05, loss="mse") as trainer:
        losses = [trainer.step(x, target) for _ in range(5)]
    assert losses[-1] < losses[0]
    # The served (compiled) model is untouched by its trainer.
    np.testing.assert_array_equal(client.infer("mixer", {"input": x})["output"], before)


@pytest.mark.parametrize("name", ["mixer_aoti", "packed"])
def test_grad_and_training_refuse_an_aotinductor_package(client: tw.Client, name: str) -> None:
    x = rows(2)
    with pytest.raises(FailedPreconditionError, match=r"AOTInductor package.*inference only"):
        client.grad(name, {"input": x}, grad_outputs={"output": np.ones_like(x)})
    with pytest.raises(FailedPreconditionError, match="cannot be trained: it runs an AOTInduc"):
        client.trainer(name, optimizer="sgd", lr=0.1)
    # The server goes on serving it.
    assert client.infer(name, {"input": x})["output"].shape == (2, FEATURES)


def test_a_factory_compiled_by_model_compile(client: tw.Client) -> None:
    x = np.linspace(-1, 1, 5)
    y = np.linspace(2, 3, 5)
    out = client.infer("two_heads", {"x": x, "y": y})
    np.testing.assert_allclose(out["sum"], x + y)
    np.testing.assert_allclose(out["prod"], np.sin(x) * y)
    out = client.infer("two_heads", {"x": x[:3], "y": y[:3]})  # another size: no recompile
    np.testing.assert_allclose(out["sum"], x[:3] + y[:3])
    assert client.info().models["two_heads"].recompilations == 0


# ----------------------------------------------------------------------------- loading


def test_formats_are_told_by_their_contents(
    repository: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, module = repository
    package = root / "mixer_aoti" / "1" / MIXER_AOTI_PACKAGE
    assert file_format(root / "scaler" / "1" / "model.pt") == "torchscript"
    assert file_format(root / "scaler" / "2" / "model.pt2") == "export"
    assert file_format(package) == "aotinductor"
    # A package named model.pt still loads as what it is.
    folder = tmp_path / "renamed"
    (folder / "1").mkdir(parents=True)
    shutil.copy(package, folder / "1" / "model.pt")
    (folder / "model.toml").write_text("max_batch_size = 4\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler to be found: none is needed
    loaded = load_version(read_config(folder), 1)
    assert (loaded.kind, loaded.execution) == ("aotinductor", "aotinductor")
    assert [s.name for s in loaded.inputs] == ["input"]  # from the package's metadata
    x = torch.from_numpy(rows(3))
    torch.testing.assert_close(loaded.module(x), torch.from_numpy(eager(module, x.numpy())))
    monkeypatch.undo()
    # Without metadata a package's inputs are named by position (its call spec).
    assert _call_spec_inputs(AOTInductorModule(package)) == (IOSpec("input0"),)
    junk = tmp_path / "junk.pt2"
    with zipfile.ZipFile(junk, "w") as archive:
        archive.writestr("junk/readme.txt", "hello")
    assert file_format(junk) == "export"  # contents tell nothing: the extension decides
    with pytest.raises(ValueError, match=r"cannot load torch\.export or AOTInductor .*junk"):
        load_model("junk", str(junk))
    with pytest.raises(ValueError, match="no such file"):
        load_model("gone", str(tmp_path / "gone.pt2"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('mode = "fast"', "compile.mode must be one of off, default, max-autotune, reduce-o"),
        ('on_failure = "ignore"', "compile.on_failure must be one of eager, fail"),
        ('grad = "yes"', "compile.grad must be true or false"),
        ("modes = 1", "unknown key compile.modes: did you mean compile.mode?"),
    ],
)
def test_compile_table_is_checked(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "model.toml").write_text(f"[compile]\n{table}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config(tmp_path)


def test_compiling_needs_warmup_inputs_and_an_eager_module(
    repository: tuple[Path, torch.nn.Module],
) -> None:
    root, _ = repository
    engine = Engine(torch.device("cpu"))
    unshaped = ModelConfig("m", compile=Compilation("default"))
    scripted = read_config(root / "scaler")
    entries = {
        "inputs that each declare a dtype and a shape": engine.registry.serve(
            unshaped, {1: load_model("m", "support.toy_models:quadratic")}
        ),
        "a TorchScript model cannot be compiled": engine.registry.serve(
            dataclasses.replace(scripted, compile=Compilation("default")),
            {1: load_version(scripted, 1)},
        ),
        "an AOTInductor package is compiled already": engine.registry.serve(
            dataclasses.replace(read_config(root / "mixer_aoti"), compile=Compilation("default")),
            {1: load_version(read_config(root / "mixer_aoti"), 1)},
        ),
    }
    for reason, entry in entries.items():
        assert reason in entry.failures[1]
