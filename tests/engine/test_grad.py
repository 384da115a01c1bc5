"""Grad equals torch.autograd run locally, and finite differences in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.toy_models import Quadratic

from tensorwire import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError
from tensorwire_server.models.builtins import builtin_models

RNG = np.random.default_rng(4)


def test_scalar_output_gradient_and_parameter_gradients(client: Client) -> None:
    x = RNG.standard_normal(5)
    model = Quadratic()
    xt = torch.from_numpy(x).requires_grad_(True)
    y = model(xt)
    expected = torch.autograd.grad(y, [xt, *model.parameters()])
    r = client.grad("quadratic", x, param_grads=True)
    np.testing.assert_allclose(r.outputs["output"], y.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(r.grads["x"], expected[0].numpy(), rtol=1e-12)
    assert list(r.param_grads) == ["a", "b"]
    np.testing.assert_allclose(r.param_grads["a"], expected[1].numpy(), rtol=1e-12)
    np.testing.assert_allclose(r.param_grads["b"], expected[2].numpy(), rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "mlp64"])
def test_vector_jacobian_product_equals_local_autograd(client: Client, name: str) -> None:
    model = builtin_models()[name].module
    dtype = np.float32 if name == "mlp" else np.float64
    x = RNG.standard_normal((3, 16)).astype(dtype)
    v = RNG.standard_normal((3, 4)).astype(dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = model(xt)
    expected = torch.autograd.grad(out, [xt, *model.parameters()], torch.from_numpy(v))
    r = client.grad(name, {"input": x}, wrt=["input"], grad_outputs={"output": v}, param_grads=True)
    np.testing.assert_array_equal(r.outputs["output"], out.detach().numpy())
    np.testing.assert_allclose(r.grads["input"], expected[0].numpy(), rtol=1e-6, atol=1e-7)
    for (pname, _), want in zip(model.named_parameters(), expected[1:], strict=True):
        np.testing.assert_allclose(r.param_grads[pname], want.numpy(), rtol=1e-6, atol=1e-7)


def test_mlp64_gradient_equals_central_finite_differences(client: Client) -> None:
    x = RNG.standard_normal((1, 16))
    v = RNG.standard_normal((1, 4))
    analytic = client.grad("mlp64", x, grad_outputs=v).grads["input"]

    def f(z: np.ndarray) -> float:
        return float((client.infer("mlp64", z)["output"] * v).sum())

    h = 1e-6
    numeric = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        numeric.flat[i] = (f(x + e) - f(x - e)) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_multiple_outputs_only_those_given_grad_outputs_count(client: Client) -> None:
    x, y = RNG.standard_normal(4), RNG.standard_normal(4)
    v = RNG.standard_normal(4)
    r = client.grad("two_heads", [x, y], grad_outputs={"prod": v})
    np.testing.assert_allclose(r.grads["x"], np.cos(x) * y * v, rtol=1e-12)
    np.testing.assert_allclose(r.grads["y"], np.sin(x) * v, rtol=1e-12)
    assert set(r.outputs) == {"sum", "prod"}


def test_function_gradients_by_position(client: Client) -> None:
    a = RNG.standard_normal((4, 4)) + 4 * np.eye(4)
    b = RNG.standard_normal((4, 2))
    v = RNG.standard_normal((4, 2))
    at, bt = (torch.from_numpy(t).requires_grad_(True) for t in (a, b))
    out = torch.linalg.solve(at, bt)
    ga, gb = torch.autograd.grad(out, [at, bt], torch.from_numpy(v))
    r = client.call_grad("linalg.solve", a, b, wrt=(0, 1), grad_outputs=v)
    np.testing.assert_allclose(r.outputs["output"], out.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(r.grads["0"], ga.numpy(), rtol=1e-10)
    np.testing.assert_allclose(r.grads["1"], gb.numpy(), rtol=1e-10)
    det = client.call_grad("linalg.det", a)
    np.testing.assert_allclose(det.grads["0"], np.linalg.det(a) * np.linalg.inv(a).T, rtol=1e-10)
    softmax = client.call_grad("softmax", a, dim=-1, grad_outputs=v[:, :1].repeat(4, 1))
    at = torch.from_numpy(a).requires_grad_(True)
    (want,) = torch.autograd.grad(
        torch.softmax(at, -1), at, torch.from_numpy(v[:, :1].repeat(4, 1))
    )
    np.testing.assert_allclose(softmax.grads["0"], want.numpy(), rtol=1e-10)


def test_unused_inputs_get_zero_gradients(client: Client) -> None:
    r = client.call_grad("amax", np.array([1.0, 3.0, 2.0]), wrt=0)
    np.testing.assert_array_equal(r.grads["0"], [0.0, 1.0, 0.0])
    x = np.ones(3)
    r = client.grad("two_heads", [x, x], wrt=["x"], grad_outputs={"sum": np.zeros(3)})
    np.testing.assert_array_equal(r.grads["x"], np.zeros(3))


def test_integer_and_bool_inputs_cannot_be_differentiated(client: Client) -> None:
    for arr in (np.arange(3), np.array([True, False])):
        with pytest.raises(FailedPreconditionError, match="input 'input' has dtype"):
            client.grad("identity", arr, wrt="input", grad_outputs=np.ones(arr.shape))
    with pytest.raises(FailedPreconditionError, match="input '0' has dtype int64"):
        client.call_grad("sum", np.arange(3))


def test_non_scalar_output_without_grad_outputs_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match=r"output \[2, 4\]; without grad_outputs"):
        client.grad("mlp", np.ones((2, 16), np.float32))
    with pytest.raises(InvalidArgumentError, match="grad_outputs 'output' has shape"):
        client.grad("mlp", np.ones((2, 16), np.float32), grad_outputs=np.ones((3, 4), np.float32))
    with pytest.raises(InvalidArgumentError, match="wrt names 'nope'"):
        client.grad("quadratic", np.ones(5), wrt="nope")


def test_wrt_that_is_not_a_name_says_what_it_takes(client: Client) -> None:
    x = np.ones((2, 16), np.float32)
    for wrt in ([0], 0, ["input", 1]):
        with pytest.raises(InvalidArgumentError, match=r"by name .*call_grad"):
            client.grad("mlp", x, wrt=wrt, grad_outputs=np.ones((2, 4), np.float32))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="by position"):
        client.call_grad("sum", np.ones(3), wrt="0")  # type: ignore[arg-type]
    # What it takes works, and positions of a function's arguments too.
    assert client.call_grad("sum", np.ones(3), wrt=np.int64(0)).grads["0"].tolist() == [1, 1, 1]


def test_a_function_named_as_a_model_points_to_the_function_methods(client: Client) -> None:
    a = np.ones((2, 2))
    with pytest.raises(NotFoundError, match=r"'matmul' is an allowlisted function.*call_grad"):
        client.grad("matmul", [a, a], grad_outputs=a)
    with pytest.raises(NotFoundError, match=r"'matmul' is an allowlisted function.*Call"):
        client.infer("matmul", [a, a])
    with pytest.raises(NotFoundError, match="model 'no-such-thing' not found"):
        client.infer("no-such-thing", a)  # no hint where none applies
