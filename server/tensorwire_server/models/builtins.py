"""The models every server serves with no configuration (identity, echo and two seeded
MLPs) and how each is served."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from tensorwire_server.models.config import Batching, ModelConfig
from tensorwire_server.models.model import IOSpec, Model

# The built-in MLPs batch: rows of 16 floats, stacked up to this many per forward.
BUILTIN_MAX_BATCH = 1024
_BATCHED_BUILTINS = ("mlp", "mlp64")


class Identity(nn.Module):
    """Returns its input unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


class Echo(nn.Module):
    """Returns every input under its own name."""

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(inputs)


class MLP(nn.Module):
    """A small tanh multilayer perceptron with fixed, seeded weights."""

    def __init__(
        self, sizes: tuple[int, ...] = (16, 32, 32, 4), dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out, dtype=dtype)
            with torch.no_grad():
                bound = fan_in**-0.5
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.uniform_(-bound, bound, generator=generator)
            layers.append(linear)
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(input)
        return out


def builtin_models() -> dict[str, Model]:
    """The models every server serves with no configuration, freshly built."""
    any_tensor = IOSpec("input")
    models = [
        Model(
            "identity",
            Identity(),
            (any_tensor,),
            (IOSpec("output"),),
            "builtin",
            "Returns its one input unchanged, any dtype and shape.",
        ),
        Model(
            "echo",
            Echo(),
            (),
            (),
            "builtin",
            "Returns every input under its own name, any number, dtype and shape.",
            variadic=True,
        ),
    ]
    for name, dtype in (("mlp", "float32"), ("mlp64", "float64")):
        mlp = MLP(dtype=getattr(torch, dtype))
        models.append(
            Model(
                name,
                mlp,
                (IOSpec("input", dtype, (-1, 16)),),
                (IOSpec("output", dtype, (-1, 4)),),
                "builtin",
                f"A 16-32-32-4 tanh MLP in {dtype} with fixed seeded weights.",
            )
        )
    return {m.name: m for m in models}


def builtin_config(model: Model, dynamic_batching: bool) -> ModelConfig:
    """How a built-in model is served: the MLPs batch concurrent requests with no
    queue delay (an idle server answers at once; a busy one batches what waits)."""
    batched = model.name in _BATCHED_BUILTINS
    return ModelConfig.of(
        model,
        max_batch_size=BUILTIN_MAX_BATCH if batched else 0,
        batching=Batching() if batched and dynamic_batching else None,
    )
