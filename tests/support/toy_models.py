"""Operator-style Python models the tests serve by ``module:factory``."""

from __future__ import annotations

import torch
from torch import nn

from tensorwire_server.models.model import IOSpec, Model


class Quadratic(nn.Module):
    """Scalar output: sum((A x)**2) + b . x, float64."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(5, 5, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.a.T) ** 2).sum() + x @ self.b


def quadratic() -> nn.Module:
    return Quadratic()


class TwoHeads(nn.Module):
    """Two named outputs from two inputs."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": x + y, "prod": torch.sin(x) * y}


def two_heads() -> Model:
    return Model(
        "two_heads",
        TwoHeads(),
        (IOSpec("x", "float64", (-1,)), IOSpec("y", "float64", (-1,))),
        (IOSpec("sum"), IOSpec("prod")),
        description="x + y and sin(x) * y",
    )


class Rows(nn.Module):
    """Each row of its input as an output of its own: many outputs from one input."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"row{i}": row for i, row in enumerate(x.unbind(0))}


def rows() -> Model:
    return Model("rows", Rows(), (IOSpec("x"),), (), description="x's rows, one output each")


class Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("this model refuses every input")


def raises() -> nn.Module:
    return Raises()


class Hog(nn.Module):
    """Asks for far more memory than any machine has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(1 << 58, dtype=torch.uint8, device=x.device)


def hog() -> nn.Module:
    return Hog()


class BrokenParameters(nn.Module):
    def named_parameters(self, *args: object, **kwargs: object):  # type: ignore[override]
        raise RuntimeError("a server-side bug")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def broken_info() -> nn.Module:
    return BrokenParameters()


class Sleeper(nn.Module):
    """Sleeps for x seconds (a float64 scalar), then returns it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(float(x))
        return x


def sleeper() -> nn.Module:
    return Sleeper()


def slow_to_load() -> nn.Module:
    """Takes TENSORWIRE_TEST_LOAD_SECONDS to load: a server's starting state lasts."""
    import os
    import time

    time.sleep(float(os.environ.get("TENSORWIRE_TEST_LOAD_SECONDS", "0")))
    return Sleeper()


class DeviceFailure(nn.Module):
    """Fails as a poisoned CUDA context does: with a sticky CUDA error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def device_failure() -> nn.Module:
    return DeviceFailure()


class DeviceAssert(nn.Module):
    """A real device-side assert on CUDA: an index far past the input's end, checked
    by the gather kernel on the device (asynchronously; the context is poisoned)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[torch.full((1,), 1 << 30, dtype=torch.long, device=x.device)]


def device_assert() -> nn.Module:
    return DeviceAssert()


class SlowDouble(nn.Module):
    """2 * x, after holding its stream for about ``cycles`` GPU clock cycles (CUDA;
    torch.cuda._sleep): a producer that finishes late, for stream-race tests."""

    def __init__(self, cycles: int = 1 << 27) -> None:
        super().__init__()
        self.cycles = cycles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda._sleep(self.cycles)
        return x * 2


def slow_double() -> nn.Module:
    return SlowDouble()
