"""A repository of compiled models for tests, small enough to compile in CI:
examples/make_compiled_repo.py's ``mixer`` (torch.compile, Grad's graph too) and
``mixer_aoti`` (an AOTInductor package), the test repository's models
(``make_repository``), and three that do not compile: ``fallback`` (its compilation
fails and it serves eagerly), ``strict`` (the same with on_failure = "fail") and
``cudagraphs`` (reduce-overhead, CUDA only, on a CPU server)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from support.repo_fixtures import make_repository

_SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_compiled_repo.py"
_spec = importlib.util.spec_from_file_location("make_compiled_repo", _SCRIPT)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
sys.modules["make_compiled_repo"] = example
_spec.loader.exec_module(example)

FEATURES = 8
HIDDEN = 16
MAX_BATCH = 16
MIXER_AOTI_PACKAGE = "model.pt2"

#: Specializes its batch dimension (reshape to 2 rows): compiling it dynamic fails.
SPECIALIZED_PY = """\
import torch
from torch import nn


class Specialized(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1) * 2


def build() -> nn.Module:
    return Specialized()
"""

UNCOMPILABLE_TOML = """\
factory = "model.py:build"
max_batch_size = 8

[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, 4]

[compile]
mode = "{mode}"
on_failure = "{on_failure}"
"""


def build_compiled_repository(root: Path) -> tuple[Path, torch.nn.Module]:
    """Write the repository; return it and the mixer's eager module."""
    make_repository(root)
    module = example.write_repository(
        root, features=FEATURES, hidden=HIDDEN, depth=1, max_batch_size=MAX_BATCH
    )
    toml = root / "mixer" / "model.toml"
    toml.write_text(toml.read_text() + "grad = true  # warm-up compiles Grad's graph too\n")
    models = {
        "fallback": ("default", "eager"),
        "strict": ("default", "fail"),
        "cudagraphs": ("reduce-overhead", "eager"),
    }
    for name, (mode, on_failure) in models.items():
        folder = root / name
        (folder / "1").mkdir(parents=True)
        (folder / "model.py").write_text(SPECIALIZED_PY)
        toml = UNCOMPILABLE_TOML.format(mode=mode, on_failure=on_failure)
        (folder / "model.toml").write_text(toml)
        # Weights for a module without any: an empty safetensors file.
        example.save_file({}, folder / "1" / "model.safetensors")
    return root, module


def mixer_grads(
    module: torch.nn.Module, x: np.ndarray, seed: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Eager autograd's gradients of the mixer: w.r.t. ``x`` and its parameters, for
    the output vector ``seed``."""
    inputs = torch.from_numpy(x).requires_grad_(True)
    params = dict(module.named_parameters())
    out = module(inputs)
    grads = torch.autograd.grad(out, [inputs, *params.values()], torch.from_numpy(seed))
    return grads[0].numpy(), {n: g.numpy() for n, g in zip(params, grads[1:], strict=True)}
