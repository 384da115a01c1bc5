"""The model repository, loading: every version-file format computing what it should,
factories, the errors that name the file at fault, the example repository and
``--model`` sources (no server needed). Reading model.toml: test_repository."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.repo_fixtures import (
    EXAMPLE_REPOSITORY,
    expected_regressor,
    expected_scaler,
    make_broken_model,
    make_repository,
    regressor_weights,
)

from tensorwire_server.models.config import ConfigError, ModelConfig, read_config
from tensorwire_server.models.loader import load_model, load_version
from tensorwire_server.models.model import IOSpec
from tensorwire_server.models.repository import model_names, version_numbers

X = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5  # integers: exact results


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo")


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("version", "kind"), [(1, "torchscript"), (2, "export")])
def test_scaler_versions_load_and_compute(repo: Path, version: int, kind: str) -> None:
    config = read_config(repo / "scaler")
    loaded = load_version(config, version)
    assert loaded.name == "scaler"
    assert loaded.kind == kind
    assert loaded.description == config.description
    assert loaded.inputs == config.inputs
    assert loaded.outputs == config.outputs
    assert not loaded.variadic
    assert loaded.extra["version"] == version
    if kind == "torchscript":
        assert not loaded.module.training
    with torch.no_grad():
        for x in (X, X[:1], X[:0]):
            expected = expected_scaler(version, x)
            torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(expected_scaler(version, X), X * (version + 1))


@pytest.mark.parametrize("version", [1, 2])
def test_regressor_versions_load_and_compute(repo: Path, version: int) -> None:
    config = read_config(repo / "regressor")
    loaded = load_version(config, version)
    assert loaded.kind == "safetensors"
    assert loaded.name == "regressor"
    assert loaded.inputs == config.inputs
    assert loaded.outputs == config.outputs
    assert not loaded.module.training
    assert {n for n, _ in loaded.named_parameters()} == {"linear.weight", "linear.bias"}
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())
    with torch.no_grad():
        got = loaded.module(X)
    torch.testing.assert_close(got, expected_regressor(version, X), rtol=0, atol=0)
    weights = regressor_weights(version)
    by_hand = X @ weights["linear.weight"].T + weights["linear.bias"]
    torch.testing.assert_close(got, by_hand, rtol=0, atol=0)


def test_regressor_versions_differ(repo: Path) -> None:
    config = read_config(repo / "regressor")
    with torch.no_grad():
        one, two = (load_version(config, v).module(X) for v in (1, 2))
    assert not torch.equal(one, two)


def test_without_a_declared_signature_the_file_tells(repo: Path) -> None:
    for name in ("scaler", "regressor"):
        (repo / name / "model.toml").write_text(
            'factory = "model.py:build"\n' if name == "regressor" else ""
        )
    scaler = read_config(repo / "scaler")
    scripted = load_version(scaler, 1)
    assert scripted.inputs == (IOSpec("input"),)
    assert scripted.outputs == ()
    assert scripted.description == f"TorchScript model from {repo / 'scaler' / '1' / 'model.pt'}"
    exported = load_version(scaler, 2)
    assert exported.inputs == (IOSpec("input", "float32", (-1, 4)),)
    assert "model.pt2" in exported.description
    regressor = load_version(read_config(repo / "regressor"), 1)
    assert regressor.inputs == (IOSpec("input"),)
    assert "model.py:build" in regressor.description
    assert "1/model.safetensors" in regressor.description


def test_a_factory_file_is_read_again_on_every_load(repo: Path) -> None:
    config = read_config(repo / "regressor")
    first = load_version(config, 1)
    source = repo / "regressor" / "model.py"
    source.write_text(source.read_text() + "\n\ndef build():\n    raise OSError('gone')\n")
    with pytest.raises(ConfigError, match="OSError: gone"):
        load_version(config, 1)
    assert not (repo / "regressor" / "__pycache__").exists()
    assert not first.module.training


def load_error(config: ModelConfig, version: int = 1) -> str:
    with pytest.raises(ConfigError) as caught:
        load_version(config, version)
    return str(caught.value)


def test_the_broken_model_names_its_file(tmp_path: Path) -> None:
    folder = make_broken_model(tmp_path)
    config = read_config(folder)
    assert config.name == "broken"
    assert version_numbers(config) == [1]
    message = load_error(config)
    assert message.startswith(f"{folder / '1' / 'model.pt'}: cannot load the TorchScript model: ")
    assert "RuntimeError" in message


def test_corrupt_export_and_weights_name_their_files(repo: Path) -> None:
    (repo / "scaler" / "2" / "model.pt2").write_bytes(b"\x00" * 64)
    message = load_error(read_config(repo / "scaler"), 2)
    assert message.startswith(f"{repo / 'scaler' / '2' / 'model.pt2'}: cannot load the torch.e")
    (repo / "regressor" / "1" / "model.safetensors").write_bytes(b"garbage")
    message = load_error(read_config(repo / "regressor"), 1)
    assert message.startswith(f"{repo / 'regressor' / '1' / 'model.safetensors'}: cannot load")


def test_a_version_folder_holds_exactly_one_model_file(repo: Path) -> None:
    config = read_config(repo / "scaler")
    (repo / "scaler" / "3").mkdir()
    (repo / "scaler" / "3" / "notes.txt").write_text("no model here")
    message = load_error(config, 3)
    assert message == (
        f"{repo / 'scaler' / '3'}: holds none of model.pt, model.pt2, model.safetensors"
    )
    shutil.copy(repo / "scaler" / "2" / "model.pt2", repo / "scaler" / "1")
    message = load_error(config, 1)
    assert message.startswith(f"{repo / 'scaler' / '1'}: holds model.pt and model.pt2")
    assert "no such version folder" in load_error(config, 9)


def test_weights_need_a_factory(repo: Path) -> None:
    config = dataclasses.replace(read_config(repo / "regressor"), factory=None)
    message = load_error(config)
    assert message.startswith(f"{repo / 'regressor' / '1' / 'model.safetensors'}: ")
    assert "factory" in message


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("missing.py:build", "factory 'missing.py:build' failed: FileNotFoundError"),
        ("model.py:nothing", "factory 'model.py:nothing' failed: AttributeError"),
        ("no_such_package_xyz:build", "failed: ModuleNotFoundError"),
        ("support.toy_models:Quadratic.forward", "failed: "),
        ("bad.py:build", "factory 'bad.py:build' failed: ZeroDivisionError: division by zero"),
        ("bad.py:not_a_module", "factory 'bad.py:not_a_module' returned int, not a Module"),
    ],
)
def test_a_failing_factory_is_a_config_error(repo: Path, factory: str, expected: str) -> None:
    (repo / "regressor" / "bad.py").write_text(
        "def build():\n    return 1 / 0\n\ndef not_a_module():\n    return 3\n"
    )
    config = dataclasses.replace(read_config(repo / "regressor"), factory=factory)
    message = load_error(config)
    assert message.startswith(f"{repo / 'regressor' / '1' / 'model.safetensors'}: "), message
    assert expected in message, message


def test_weights_that_do_not_fit_the_module_are_a_config_error(repo: Path) -> None:
    weights = regressor_weights(1)
    only_weight = {"linear.weight": weights["linear.weight"]}
    save_file(only_weight, repo / "regressor" / "1" / "model.safetensors")
    save_file(
        {**weights, "linear.bias": torch.zeros(3)}, repo / "regressor" / "2" / "model.safetensors"
    )
    config = read_config(repo / "regressor")
    message = load_error(config, 1)
    assert "the weights do not fit the module factory 'model.py:build' builds" in message
    assert 'Missing key(s) in state_dict: "linear.bias"' in message
    assert "size mismatch for linear.bias" in load_error(config, 2)


# ----------------------------------------------------------------------------- the example


def test_the_example_repository_loads_every_model_and_version() -> None:
    assert model_names(EXAMPLE_REPOSITORY) == ["regressor", "scaler"]
    loaded = 0
    for name in model_names(EXAMPLE_REPOSITORY):
        config = read_config(EXAMPLE_REPOSITORY / name)
        assert config.description and config.inputs and config.outputs and config.warmup
        assert version_numbers(config)
        for version in version_numbers(dataclasses.replace(config, versions="all")):
            model = load_version(config, version)
            expected = expected_scaler if name == "scaler" else expected_regressor
            with torch.no_grad():
                torch.testing.assert_close(model.module(X), expected(version, X))
            loaded += 1
    assert loaded == 4
    scaler = read_config(EXAMPLE_REPOSITORY / "scaler")
    assert scaler.batching is not None and scaler.instances > 1
    assert not (EXAMPLE_REPOSITORY / "regressor" / "__pycache__").exists()


# ----------------------------------------------------------------------------- --model


def test_load_model_still_loads_files_and_factories(repo: Path) -> None:
    scripted = load_model("s", str(repo / "scaler" / "1" / "model.pt"))
    assert (scripted.kind, scripted.inputs) == ("torchscript", (IOSpec("input"),))
    exported = load_model("e", str(repo / "scaler" / "2" / "model.pt2"))
    assert exported.kind == "export"
    assert exported.inputs == (IOSpec("input", "float32", (-1, 4)),)
    torch.testing.assert_close(exported.module(X), X * 3)
    factory = load_model("q", "support.toy_models:quadratic")
    assert (factory.kind, factory.inputs) == ("python", (IOSpec("x"),))
    with pytest.raises(ValueError, match="cannot load TorchScript"):
        load_model("b", str(make_broken_model(repo) / "1" / "model.pt"))


def test_load_model_resolves_factories_as_the_repository_does() -> None:
    with pytest.raises(ValueError, match=r"only a model repository's model\.toml may name one"):
        load_model("m", "model.py:build")  # a file factory needs a model's folder
    with pytest.raises(ValueError, match=r"factory 'os:getcwd' returned str, not a Module"):
        load_model("m", "os:getcwd")
    with pytest.raises(
        ValueError, match=r"factory 'support.toy_models:nothing' failed: AttributeError"
    ):
        load_model("m", "support.toy_models:nothing")
