"""The model repository: model.toml parsing and validation, version policies and
factories (no server needed). Loading every version-file format and the errors
that name the file at fault: test_repository_loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.repo_fixtures import make_broken_model, make_repository

from tensorwire_server.models.config import (
    Batching,
    ConfigError,
    ModelConfig,
    WarmupInput,
    read_config,
)
from tensorwire_server.models.loader import load_version
from tensorwire_server.models.model import IOSpec
from tensorwire_server.models.repository import model_names, version_numbers

BATCHED = """\
max_batch_size = 32
[[inputs]]
name = "input"
dtype = "float32"
shape = [-1, 4]
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo")


def model(tmp_path: Path, toml: str, name: str = "m", versions: tuple[int, ...] = ()) -> Path:
    """A model folder with ``toml`` as its model.toml and empty version folders."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.toml").write_text(toml)
    for version in versions:
        (folder / str(version)).mkdir()
    return folder


def config_error(folder: Path) -> str:
    """The message of the ConfigError that reading ``folder``'s model.toml raises; it
    names the file."""
    with pytest.raises(ConfigError) as caught:
        read_config(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'model.toml'}: "), message
    return message


# ----------------------------------------------------------------------------- model_names


def test_model_names_are_the_folders_holding_a_model_toml(repo: Path) -> None:
    assert model_names(repo) == ["regressor", "scaler"]
    make_broken_model(repo, "a-broken")
    (repo / "not-a-model").mkdir()
    (repo / "README.txt").write_text("a file")
    assert model_names(repo) == ["a-broken", "regressor", "scaler"]


def test_model_names_of_an_empty_repository(tmp_path: Path) -> None:
    assert model_names(tmp_path) == []


def test_model_names_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        model_names(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        model_names(tmp_path / "file")


# ----------------------------------------------------------------------------- read_config


def test_read_config_of_the_fixture(repo: Path) -> None:
    spec = IOSpec("input", "float32", (-1, 4))
    assert read_config(repo / "scaler") == ModelConfig(
        name="scaler",
        description="input times 2 (version 1) or 3 (version 2)",
        inputs=(spec,),
        outputs=(IOSpec("output", "float32", (-1, 4)),),
        max_batch_size=32,
        batching=Batching(max_queue_delay=0.001),
        path=repo / "scaler",
    )
    regressor = read_config(repo / "regressor")
    assert regressor.factory == "model.py:build"
    assert regressor.batching is None
    assert regressor.outputs == (IOSpec("output", "float32", (-1, 2)),)


def test_an_empty_model_toml_means_the_defaults(tmp_path: Path) -> None:
    folder = model(tmp_path, "")
    assert read_config(folder) == ModelConfig(name="m", path=folder)


def test_read_config_reads_every_key(tmp_path: Path) -> None:
    folder = model(
        tmp_path,
        """
description = "all of it"
max_batch_size = 16
instances = 3
devices = ["cpu", "cuda", "cuda:1"]
precision = "bfloat16"
max_queue_size = 7
factory = "pkg.mod:make"
versions = "latest:02"

[[inputs]]
name = "a"
dtype = "float16"
shape = [-1, 3, 3]
[[inputs]]
name = "b"
[[outputs]]
name = "c"
shape = [-1]

[dynamic_batching]
max_queue_delay_ms = 2.5
preferred_batch_sizes = [16, 4, 8, 4]

[[warmup]]
a = { shape = [2, 3, 3] }
b = { shape = [2], dtype = "int64", fill = "random" }
[[warmup]]
a = { shape = [16, 3, 3], dtype = "float16", fill = "ones" }
b = { shape = [16, 2], dtype = "bool" }
""",
        name="every-key",
    )
    config = read_config(folder)
    assert config == ModelConfig(
        name="every-key",
        description="all of it",
        inputs=(IOSpec("a", "float16", (-1, 3, 3)), IOSpec("b")),
        outputs=(IOSpec("c", None, (-1,)),),
        max_batch_size=16,
        batching=Batching(max_queue_delay=0.0025, preferred_batch_sizes=(4, 8, 16)),
        instances=3,
        devices=("cpu", "cuda", "cuda:1"),
        precision="bfloat16",
        max_queue_size=7,
        warmup=(
            {
                "a": WarmupInput((2, 3, 3), "float16"),
                "b": WarmupInput((2,), "int64", "random"),
            },
            {
                "a": WarmupInput((16, 3, 3), "float16", "ones"),
                "b": WarmupInput((16, 2), "bool"),
            },
        ),
        factory="pkg.mod:make",
        versions="latest:2",
        path=folder,
    )


def test_explicit_versions_and_warmup_without_declared_inputs(tmp_path: Path) -> None:
    folder = model(tmp_path, 'versions = [3, 1]\n[[warmup]]\nx = { shape = [2], dtype = "int8" }')
    config = read_config(folder)
    assert config.versions == (1, 3)
    assert config.warmup == ({"x": WarmupInput((2,), "int8")},)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        # unknown keys and wrong types
        (
            "max_batch = 4",
            "unknown key max_batch: did you mean max_batch_size? (known keys: description, ",
        ),
        ("colour = 4", "unknown key colour (known keys: description, "),
        ("description = 5", "description must be a string, not 5"),
        ("max_batch_size = -3", "max_batch_size must be an integer >= 0, not -3"),
        ("max_batch_size = true", "max_batch_size must be an integer >= 0, not true"),
        ('max_batch_size = "4"', "max_batch_size must be an integer >= 0, not '4'"),
        ("max_batch_size = 4.0", "max_batch_size must be an integer >= 0, not 4.0"),
        ("instances = 0", "instances must be an integer >= 1, not 0"),
        ("instances = false", "instances must be an integer >= 1, not false"),
        ("max_queue_size = 0", "max_queue_size must be an integer >= 1, not 0"),
        ('devices = "cpu"', 'devices must be a list of "cpu", "cuda" or "cuda:N"'),
        ('devices = ["gpu"]', 'devices[0] must be "cpu", "cuda" or "cuda:N", not \'gpu\''),
        ('devices = ["cuda:x"]', "devices[0] must be"),
        ('devices = ["cpu", "cpu"]', "devices[1] repeats 'cpu'"),
        ('precision = "float64"', "precision must be one of float32, float16, bfloat16"),
        ("factory = 3", 'factory must be "file.py:function" or'),
        ('factory = "model.py"', 'factory must be "file.py:function" or'),
        ('factory = "model.py:"', "factory must be"),
        ('versions = "latest:0"', 'versions must be "all", "latest:N" (N >= 1) or a list'),
        ('versions = "newest"', "not 'newest'"),
        ("versions = []", "versions must be"),
        ("versions = 2", "versions must be"),
        ("versions = [0]", "versions[0] must be an integer >= 1, not 0"),
        ("versions = [1, true]", "versions[1] must be an integer >= 1, not true"),
        ("versions = [2, 1, 2]", "versions[2] repeats version 2"),
        # signatures
        ('inputs = "x"', "inputs must be an array of tables ([[inputs]]), not 'x'"),
        ("inputs = [1]", "inputs[0] must be a table, not 1"),
        ('[[inputs]]\ndtype = "float32"', "inputs[0] needs a name"),
        ("[[inputs]]\nname = 1", "inputs[0].name must be a string, not 1"),
        ('[[inputs]]\nname = ""', "inputs[0].name must be a non-empty string"),
        (
            '[[inputs]]\nname = "x"\ndtyp = "float32"',
            "unknown key inputs[0].dtyp: did you mean inputs[0].dtype?",
        ),
        ('[[inputs]]\nname = "x"\ndtype = "float128"', "inputs[0].dtype must be a dtype ("),
        ('[[inputs]]\nname = "x"\nshape = [2, -2]', "inputs[0].shape[1] must be -1 or a size"),
        ('[[inputs]]\nname = "x"\nshape = "4"', "inputs[0].shape must be a list of sizes"),
        ('[[inputs]]\nname = "x"\nshape = [true]', "inputs[0].shape[0] must be -1 or"),
        (
            '[[inputs]]\nname = "x"\n[[inputs]]\nname = "y"\n[[inputs]]\nname = "x"',
            "inputs[2].name 'x' repeats inputs[0].name",
        ),
        (
            '[[outputs]]\nname = "o"\n[[outputs]]\nname = "o"',
            "outputs[1].name 'o' repeats outputs[0].name",
        ),
        (
            'max_batch_size = 4\n[[inputs]]\nname = "x"\nshape = [4, 4]',
            "inputs[0].shape must start with -1 (the batch dimension) when max_batch_size "
            "is 4 > 0, not [4, 4]",
        ),
        (
            'max_batch_size = 4\n[[outputs]]\nname = "y"\nshape = []',
            "outputs[0].shape must start with -1",
        ),
        # dynamic batching
        ("[dynamic_batching]", "[dynamic_batching] needs max_batch_size > 0"),
        ("max_batch_size = 0\n[dynamic_batching]", "[dynamic_batching] needs max_batch_size"),
        ("max_batch_size = 4\ndynamic_batching = 1", "dynamic_batching must be a table"),
        (
            "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay = 1",
            "unknown key dynamic_batching.max_queue_delay",
        ),
        (
            "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_ms = -1",
            "dynamic_batching.max_queue_delay_ms must be a number of milliseconds >= 0, not -1",
        ),
        (
            'max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_ms = "1"',
            "dynamic_batching.max_queue_delay_ms must be",
        ),
        (
            "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_ms = nan",
            "dynamic_batching.max_queue_delay_ms must be",
        ),
        (
            "max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = [2, 0]",
            "dynamic_batching.preferred_batch_sizes[1] must be an integer >= 1, not 0",
        ),
        (
            "max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = [8]",
            "dynamic_batching.preferred_batch_sizes[0] is 8, more than max_batch_size 4",
        ),
        (
            "max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = 4",
            "dynamic_batching.preferred_batch_sizes must be a list of batch sizes, not 4",
        ),
        # warm-up
        ("warmup = 3", "warmup must be an array of tables ([[warmup]]), not 3"),
        ("[[warmup]]", "warmup[0] gives no inputs"),
        (
            BATCHED + "[[warmup]]\nimput = { shape = [1, 4] }",
            "warmup[0] lacks the declared input(s) input",
        ),
        (
            BATCHED + "[[warmup]]\ninput = { shape = [1, 4] }\nother = { shape = [1] }",
            "warmup[0].other is not a declared input (inputs: input)",
        ),
        (
            BATCHED + "[[warmup]]\ninput = { shape = [-1, 4] }",
            "warmup[0].input.shape[0] must be a size >= 0, not -1",
        ),
        (BATCHED + '[[warmup]]\ninput = { dtype = "float32" }', "warmup[0].input needs a shape"),
        (BATCHED + "[[warmup]]\ninput = [1, 4]", "warmup[0].input must be a table"),
        (
            BATCHED + '[[warmup]]\ninput = { shape = [1, 4], fill = "twos" }',
            "warmup[0].input.fill must be one of zeros, ones, random, not 'twos'",
        ),
        (
            BATCHED + "[[warmup]]\ninput = { shape = [1, 4], size = 3 }",
            "unknown key warmup[0].input.size",
        ),
        (
            BATCHED + "[[warmup]]\ninput = { shape = [1, 5] }",
            "warmup[0].input.shape [1, 5] does not fit input 'input' of shape [-1, 4]",
        ),
        (
            BATCHED + "[[warmup]]\ninput = { shape = [64, 4] }",
            "warmup[0].input.shape [64, 4] needs a batch dimension of at most max_batch_size 32",
        ),
        (
            BATCHED + '[[warmup]]\ninput = { shape = [1, 4], dtype = "float64" }',
            "warmup[0].input.dtype is float64, but input 'input' is float32",
        ),
        (
            '[[inputs]]\nname = "x"\n[[warmup]]\nx = { shape = [1] }',
            "warmup[0].x needs a dtype (the input declares none)",
        ),
        ("[[warmup]]\nx = { shape = [1] }", "warmup[0].x needs a dtype"),
        (
            '[[warmup]]\nx = { shape = [1], dtype = "float8" }',
            "warmup[0].x.dtype must be a dtype (",
        ),
        (
            BATCHED + '[[inputs]]\nname = "b"\n[[warmup]]\ninput = { shape = [2, 4] }\n'
            'b = { shape = [3], dtype = "int8" }',
            "warmup[0] inputs need the same batch size (rows), not input 2, b 3",
        ),
        # not TOML at all
        ("max_batch_size = ", "not valid TOML: "),
        ("[inputs]\nname = 1\n[[inputs]]", "not valid TOML: "),
    ],
)
def test_invalid_model_toml_is_a_config_error(tmp_path: Path, toml: str, expected: str) -> None:
    message = config_error(model(tmp_path, toml))
    assert expected in message, message


def test_a_missing_model_toml_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match=r"model\.toml: missing"):
        read_config(tmp_path / "m")


def test_a_model_toml_that_is_not_text_is_a_config_error(tmp_path: Path) -> None:
    folder = model(tmp_path, "")
    (folder / "model.toml").write_bytes(b"description = '\xff\xfe'")
    assert "cannot read: UnicodeDecodeError" in config_error(folder)


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ('"all"', [5, 3, 2, 1]),
        ('"latest:1"', [5]),
        ('"latest:2"', [5, 3]),
        ('"latest:10"', [5, 3, 2, 1]),
        ("[2]", [2]),
        ("[1, 5, 3]", [5, 3, 1]),
    ],
)
def test_version_policies(tmp_path: Path, policy: str, expected: list[int]) -> None:
    folder = model(tmp_path, f"versions = {policy}", versions=(1, 2, 3, 5))
    (folder / "0").mkdir()  # not a version
    (folder / "4").write_text("a file, not a folder")
    (folder / "v6").mkdir()
    (folder / "__pycache__").mkdir()
    assert version_numbers(read_config(folder)) == expected


def test_a_listed_version_without_a_folder_is_a_config_error(tmp_path: Path) -> None:
    folder = model(tmp_path, "versions = [1, 3, 4]", versions=(1, 2))
    with pytest.raises(ConfigError) as caught:
        version_numbers(read_config(folder))
    message = str(caught.value)
    assert message.startswith(f"{folder / 'model.toml'}: versions lists 3, 4"), message
    assert str(folder) in message


def test_no_version_is_a_config_error(tmp_path: Path) -> None:
    folder = model(tmp_path, "")
    (folder / "latest").mkdir()
    with pytest.raises(ConfigError, match=r"no version folders \(1/, 2/, ...\)") as caught:
        version_numbers(read_config(folder))
    assert str(folder) in str(caught.value)


def test_a_version_folder_with_leading_zeros_is_a_config_error(tmp_path: Path) -> None:
    folder = model(tmp_path, "", versions=(1,))
    (folder / "02").mkdir()
    with pytest.raises(ConfigError, match="without leading zeros") as caught:
        version_numbers(read_config(folder))
    assert str(folder / "02") in str(caught.value)


def test_the_fixture_versions(repo: Path) -> None:
    assert version_numbers(read_config(repo / "scaler")) == [2, 1]
    assert version_numbers(read_config(repo / "regressor")) == [2, 1]


# ----------------------------------------------------------------------------- factories


def test_an_importable_factory_and_one_returning_a_model(tmp_path: Path) -> None:
    # toy_models (tests/ is on sys.path) builds Quadratic: parameters a (5x5) and b (5).
    folder = model(tmp_path, 'factory = "support.toy_models:quadratic"', versions=(1,))
    a = torch.eye(5, dtype=torch.float64)
    b = torch.arange(5, dtype=torch.float64)
    save_file({"a": a, "b": b}, folder / "1" / "model.safetensors")
    loaded = load_version(read_config(folder), 1)
    assert loaded.inputs == (IOSpec("x"),)
    x = torch.ones(5, dtype=torch.float64)
    # sum((x @ a.T) ** 2) + x @ b = 5 + 10
    torch.testing.assert_close(loaded.module(x).detach(), torch.tensor(15.0, dtype=torch.float64))

    folder = model(
        tmp_path, 'factory = "support.toy_models:two_heads"', name="heads", versions=(1,)
    )
    save_file({}, folder / "1" / "model.safetensors")
    heads = load_version(read_config(folder), 1)
    assert heads.name == "heads"
    assert [s.name for s in heads.inputs] == ["x", "y"]
    assert [s.name for s in heads.outputs] == ["sum", "prod"]
