"""Write a model repository of compiled models that ``tensorwire-server --model-repo``
serves: the same network two ways.

    .venv/bin/python examples/make_compiled_repo.py [DIR]   # default: examples/compiled-repo
        [--features 64] [--hidden 256] [--depth 2] [--max-batch-size 64]

``mixer``
    ``model.py`` builds a ``Mixer`` (a residual MLP: Linear, LayerNorm, GELU per
    block), ``1/model.safetensors`` holds its weights, and model.toml's ``[compile]``
    has the server torch.compile it in warm-up, before it serves (a C++ compiler is
    needed on the CPU: the server's image documents which carry one).
``mixer_aoti``
    ``1/model.pt2``, the same network and weights as an AOTInductor package, made
    here by ``torch.export`` then ``torch._inductor.aoti_compile_and_package``, with
    a dynamic batch dimension and its signature in the package's metadata. The
    server runs its compiled code as it is: no compiler needed where it serves.

Both take ``input`` float32 ``[-1, features]`` and return ``output`` float32
``[-1, features]``, dynamically batched up to ``max_batch_size`` rows. The package
is compiled for this machine's device kind (CPU here; pass ``--device cuda`` for a
GPU's) and its instruction set, and for this torch version: make it where it serves.
``expected(x)`` computes what both return, in eager PyTorch.

Migrating from TorchScript: where a model was ``torch.jit.trace``-d or scripted to a
``model.pt``, export it instead (``torch.export.export`` -> ``model.pt2``; served
as an exported program) and, for speed, either compile the package as below or serve
the Python module with ``[compile]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent

MIXER_PY = '''\
"""The mixer: a residual MLP of LayerNorm and GELU blocks, which torch.compile fuses."""

import torch
from torch import nn

FEATURES, HIDDEN, DEPTH = {features}, {hidden}, {depth}


class Block(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.up = nn.Linear(features, hidden)
        self.down = nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Mixer(nn.Module):
    def __init__(self, features: int = FEATURES, hidden: int = HIDDEN, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(features, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.norm(self.blocks(input)))


def build() -> nn.Module:
    return Mixer()
'''

MODEL_TOML = """\
description = "{description}"
max_batch_size = {max_batch_size}

[[inputs]]
name = "input"
dtype = "float32"
shape = [-1, {features}]

[[outputs]]
name = "output"
dtype = "float32"
shape = [-1, {features}]

[dynamic_batching]
max_queue_delay_ms = 2
{extra}"""

COMPILE_TOML = """
# torch.compile in warm-up, before the model serves; the batch dimension is compiled
# dynamic, so every batch size up to max_batch_size runs without recompiling.
[compile]
mode = "{mode}"        # off, default, max-autotune, reduce-overhead (CUDA graphs: CUDA only)
on_failure = "eager"   # a failed compilation serves the model eagerly (logged); "fail": not at all
"""


def build_mixer(folder: Path) -> nn.Module:
    """The mixer the server builds from ``folder``'s model.py, with this example's
    seeded weights."""
    from tensorwire_server.models.loader import build_model

    torch.manual_seed(0)
    return build_model("mixer", "model.py:build", folder).module.eval()


def write_repository(
    root: Path,
    *,
    features: int = 64,
    hidden: int = 256,
    depth: int = 2,
    max_batch_size: int = 64,
    mode: str = "default",
    device: str = "cpu",
    aoti: bool = True,
    eager: bool = False,
) -> nn.Module:
    """Write ``mixer`` (compiled by the server in ``mode``), ``mixer_aoti`` (an
    AOTInductor package, when ``aoti``) and, when ``eager``, ``mixer_eager`` (the same
    model uncompiled, to compare with); return the eager module."""
    source = MIXER_PY.format(features=features, hidden=hidden, depth=depth)
    sizes = {"features": features, "max_batch_size": max_batch_size}
    entries = {"mixer": COMPILE_TOML.format(mode=mode)}
    if eager:
        entries["mixer_eager"] = ""
    for name in entries:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "model.py").write_text(source)
    module = build_mixer(root / "mixer")
    weights = {k: v.contiguous() for k, v in module.state_dict().items()}
    for name, extra in entries.items():
        folder = root / name
        toml = MODEL_TOML.format(description=f"the mixer ({name})", extra=extra, **sizes)
        (folder / "model.toml").write_text(f'factory = "model.py:build"\n{toml}')
        save_file(weights, folder / "1" / "model.safetensors")
    if aoti:
        folder = root / "mixer_aoti"
        (folder / "1").mkdir(parents=True, exist_ok=True)
        toml = MODEL_TOML.format(description="the mixer, AOTInductor", extra="", **sizes)
        (folder / "model.toml").write_text(toml)
        package_aoti(module, folder / "1" / "model.pt2", features, max_batch_size, device)
    return module


def package_aoti(
    module: nn.Module, path: Path, features: int, max_batch_size: int, device: str = "cpu"
) -> Path:
    """Export ``module`` with a dynamic batch dimension and compile it into an
    AOTInductor package at ``path``, its signature in the package's metadata."""
    from tensorwire_server.models.aotinductor import package_metadata
    from tensorwire_server.models.model import IOSpec

    module = module.to(device)
    example = (torch.randn(2, features, device=device),)
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    signature = package_metadata(
        [IOSpec("input", "float32", (-1, features))], [IOSpec("output", "float32", (-1, features))]
    )
    made = torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(path),
        inductor_configs={"aot_inductor.metadata": signature},
    )
    module.to("cpu")
    return Path(made)


def expected(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the mixer (either way) returns for ``x``, in eager PyTorch."""
    with torch.no_grad():
        return module(x)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(HERE / "compiled-repo"))
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--mode", default="default", help="the mixer's [compile] mode")
    parser.add_argument("--device", default="cpu", help="the package's device: cpu or cuda")
    args = parser.parse_args()
    root = Path(args.root)
    write_repository(
        root,
        features=args.features,
        hidden=args.hidden,
        depth=args.depth,
        max_batch_size=args.max_batch_size,
        mode=args.mode,
        device=args.device,
    )
    print(f"wrote {root}: mixer (torch.compile) and mixer_aoti (AOTInductor)", file=sys.stderr)


if __name__ == "__main__":
    main()
