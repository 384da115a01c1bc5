"""Write the example model repository that ``tensorwire-server --model-repo`` serves.

    .venv/bin/python examples/make_model_repo.py [DIR]    # default: examples/model-repo

Two models, two versions each, one of every file format a version folder may hold:

``scaler``
    version 1: ``model.pt``, TorchScript, ``output = input * 2``;
    version 2: ``model.pt2``, torch.export, ``output = input * 3``
    (``SCALER_FACTORS``). Input ``input`` float32 ``[-1, 4]``, output ``output`` float32
    ``[-1, 4]``, dynamically batched.
``regressor``
    ``model.py`` builds ``nn.Linear(4, 2)``; versions 1 and 2 are ``model.safetensors``
    weights for it (``regressor_weights(version)``):
    ``output = input @ weight.T + bias``. Input float32 ``[-1, 4]``, output float32
    ``[-1, 2]``. The weights are multiples of 1/4, so integer inputs give exact results.

The tests build the same models with plainer model.toml files (tests/support/repo_fixtures.py
imports this file), so what the README shows is what the tests load.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent

#: What ``input`` is multiplied by in each version of the scaler.
SCALER_FACTORS = {1: 2.0, 2: 3.0}

#: The regressor's model.py: the module its safetensors weights are loaded into.
REGRESSOR_PY = '''\
"""The regressor's module; each version folder holds its weights (model.safetensors),
loaded into what build() returns with load_state_dict(strict=True)."""

import torch
from torch import nn


class Regressor(nn.Module):
    """output = input @ weight.T + bias: 4 features in, 2 out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.linear(input)


def build() -> nn.Module:
    return Regressor()
'''

#: The example's model.toml files, commented for readers of the README.
SCALER_TOML = """\
# The scaler: multiplies its input by a constant (2 in version 1, 3 in version 2).
description = "Multiplies a batch of 4-vectors by a constant"

# Requests carry a batch dimension first; the server runs at most 32 rows at once.
# 0 would mean "no batch dimension": each request runs as it is, never batched.
max_batch_size = 32

# Two copies of the model per device, serving requests side by side.
instances = 2

# Where the instances live; leave it out to use the server's --device.
# devices = ["cuda:0", "cuda:1"]

# float32 as exported; "float16" or "bfloat16" run the model under torch.autocast.
precision = "float32"

# Requests waiting for (or running on) the model at once; more are refused at once
# with RESOURCE_EXHAUSTED rather than queued without bound.
max_queue_size = 256

# Serve every version folder (1/ is TorchScript, 2/ is torch.export). Clients ask for a
# version or get the newest. Also "latest:N" or an explicit list such as [1, 2].
versions = "all"

# The signature: requests are checked against it before they reach the model.
# -1 is any size; with max_batch_size > 0 every shape starts with the batch dimension.
[[inputs]]
name = "input"
dtype = "float32"
shape = [-1, 4]

[[outputs]]
name = "output"
dtype = "float32"
shape = [-1, 4]

# Requests arriving within 1 ms of each other run as one forward pass of up to
# max_batch_size rows; a batch of 8, 16 or 32 rows starts without waiting further.
[dynamic_batching]
max_queue_delay_ms = 1.0
preferred_batch_sizes = [8, 16, 32]

# Run before an instance serves, so that the first real request pays no start-up cost.
[[warmup]]
input = { shape = [1, 4] }                    # dtype from the input; zeros

[[warmup]]
input = { shape = [32, 4], fill = "random" }  # a full batch
"""

REGRESSOR_TOML = """\
# The regressor: a linear layer whose weights each version folder holds as
# model.safetensors (no pickles, no code in the weights).
description = "Linear regression from 4 features to 2 targets"

# model.py (next to this file) builds the module the weights are loaded into.
# "package.module:function" imports an installed module instead.
factory = "model.py:build"

max_batch_size = 64

# No [dynamic_batching]: every request runs its own forward pass.

# Only the newest version folder is served; "all" would serve both.
versions = "latest:1"

[[inputs]]
name = "input"
dtype = "float32"
shape = [-1, 4]

[[outputs]]
name = "output"
dtype = "float32"
shape = [-1, 2]

[[warmup]]
input = { shape = [64, 4], dtype = "float32", fill = "ones" }
"""


class Scale(nn.Module):
    """output = input * factor."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * self.factor


def regressor_weights(version: int) -> dict[str, torch.Tensor]:
    """The state dict of the regressor's ``version``: multiples of 1/4, different per
    version."""
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 2.0]]) * (version / 4)
    bias = torch.tensor([0.5, -1.0]) * version
    return {"linear.weight": weight, "linear.bias": bias}


def expected_scaler(version: int, x: torch.Tensor) -> torch.Tensor:
    """What the scaler's ``version`` returns for ``x``."""
    return x * SCALER_FACTORS[version]


def expected_regressor(version: int, x: torch.Tensor) -> torch.Tensor:
    """What the regressor's ``version`` returns for ``x``."""
    weights = regressor_weights(version)
    return nn.functional.linear(x, weights["linear.weight"], weights["linear.bias"])


def write_scaler(folder: Path, config: str) -> Path:
    """Write the scaler into ``folder`` with ``config`` as its model.toml."""
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "2").mkdir(exist_ok=True)
    (folder / "model.toml").write_text(config)
    with warnings.catch_warnings():  # TorchScript is deprecated, and still served
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(Scale(SCALER_FACTORS[1]).eval())
        torch.jit.save(scripted, str(folder / "1" / "model.pt"))  # type: ignore[no-untyped-call]
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        Scale(SCALER_FACTORS[2]).eval(),
        (torch.zeros(2, 4),),
        dynamic_shapes={"input": {0: batch}},
    )
    torch.export.save(program, folder / "2" / "model.pt2")
    return folder


def write_regressor(folder: Path, config: str) -> Path:
    """Write the regressor (model.py and two versions of weights) into ``folder`` with
    ``config`` as its model.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(config)
    (folder / "model.py").write_text(REGRESSOR_PY)
    for version in (1, 2):
        (folder / str(version)).mkdir(exist_ok=True)
        save_file(regressor_weights(version), folder / str(version) / "model.safetensors")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "dir", nargs="?", type=Path, default=HERE / "model-repo", help="where to write it"
    )
    root: Path = parser.parse_args(argv).dir
    write_scaler(root / "scaler", SCALER_TOML)
    write_regressor(root / "regressor", REGRESSOR_TOML)
    print(f"wrote the example model repository to {root}")


if __name__ == "__main__":
    main()
