"""Infer and Info: built-in and user models equal the same model run locally."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start
from support.toy_models import TwoHeads

from tensorwire import Client, InvalidArgumentError
from tensorwire_server.models.builtins import MLP, builtin_models
from tensorwire_server.settings import Settings


def test_info_describes_server_models_and_functions(client: Client) -> None:
    info = client.info()
    assert info.torch_version == torch.__version__
    assert info.device.name == "cpu" and info.device.total_memory_bytes > 0
    assert {"identity", "echo", "mlp", "mlp64"} <= set(info.models)
    mlp = info.models["mlp"]
    assert mlp.inputs[0].name == "input" and mlp.inputs[0].dtype == "float32"
    assert mlp.inputs[0].shape == (-1, 16) and mlp.outputs[0].shape == (-1, 4)
    assert mlp.parameter_count == sum(p.numel() for p in MLP().parameters())
    assert info.models["identity"].inputs[0].shape is None
    assert info.models["echo"].variadic
    assert len(info.functions) >= 30 and "linalg.svd" in info.functions


@pytest.mark.parametrize("name", ["mlp", "mlp64"])
def test_builtin_mlps_equal_local_torch(client: Client, name: str) -> None:
    model = builtin_models()[name]
    dtype = np.float32 if name == "mlp" else np.float64
    x = np.random.default_rng(2).standard_normal((7, 16)).astype(dtype)
    with torch.inference_mode():
        expected = model.module(torch.from_numpy(x)).numpy()
    got = client.infer(name, x)["output"]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


def test_named_inputs_requested_outputs_and_dict_results(client: Client) -> None:
    x, y = np.linspace(0, 1, 5), np.linspace(1, 2, 5)
    out = client.infer("two_heads", {"y": y, "x": x})
    expected = TwoHeads()(torch.from_numpy(x), torch.from_numpy(y))
    assert list(out) == ["sum", "prod"]
    np.testing.assert_array_equal(out["prod"], expected["prod"].numpy())
    only = client.infer("two_heads", [x, y], outputs=["prod"])
    assert list(only) == ["prod"]
    with pytest.raises(InvalidArgumentError, match="no output 'nope'"):
        client.infer("two_heads", [x, y], outputs=["nope"])


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(3, 2))

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return x @ self.w + shift


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("models")
    example = (torch.ones(4, 3), torch.zeros(2))
    torch.jit.save(torch.jit.trace(Affine(), example), folder / "affine.ts")
    batch = torch.export.Dim("batch")
    program = torch.export.export(Affine(), example, dynamic_shapes=({0: batch}, {}))
    torch.export.save(program, folder / "affine.pt2")
    models = {
        "ts": str(folder / "affine.ts"),
        "exported": str(folder / "affine.pt2"),
        "factory": "test_infer:Affine",
    }
    yield from start(Settings(port=0, device="cpu", models=models, builtins=False))


@pytest.mark.parametrize("name", ["ts", "exported", "factory"])
def test_user_models_from_every_source_equal_local(user_models: str, name: str) -> None:
    x = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    shift = np.array([1.0, -1.0], dtype=np.float32)
    expected = Affine()(torch.from_numpy(x), torch.from_numpy(shift)).detach().numpy()
    with Client(user_models) as c:
        info = c.info()
        assert set(info.models) == {"ts", "exported", "factory"}
        assert [s.name for s in info.models[name].inputs] == ["x", "shift"]
        np.testing.assert_allclose(c.infer(name, [x, shift])["output"], expected, rtol=1e-6)
        np.testing.assert_allclose(
            c.infer(name, {"shift": shift, "x": x})["output"], expected, rtol=1e-6
        )
        grads = c.grad(name, [x, shift], wrt="x", grad_outputs=np.ones((5, 2), np.float32))
        np.testing.assert_allclose(grads.grads["x"], np.tile([1.0, 5.0, 9.0], (5, 1)))
    if name == "exported":
        spec = info.models[name].inputs[0]
        assert spec.dtype == "float32" and spec.shape == (-1, 3)
