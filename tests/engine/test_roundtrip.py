"""Every dtype and layout through the identity model over real gRPC, bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
from support.arrays import sample

from tensorwire import Client
from tensorwire.wire.dtypes import NAMES, NUMPY_BY_WIRE


@pytest.mark.parametrize("dtype", list(NUMPY_BY_WIRE.values()), ids=NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (2, 0), (3, 5), (300, 70)], ids=str)
def test_identity_returns_every_dtype_bit_exact(client: Client, dtype: np.dtype, shape) -> None:  # type: ignore[no-untyped-def]
    arr = sample(dtype, shape)
    out = client.infer("identity", arr)["output"]
    assert out.dtype == dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


@pytest.mark.parametrize("rows", [4, 5000], ids=["small", "large"])
@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::3, ::2],
        lambda a: np.asfortranarray(a),
        lambda a: a.astype(">f4"),
        lambda a: a.T,
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["strided", "fortran", "big-endian", "transposed", "broadcast"],
)
def test_any_layout_comes_back_as_the_same_values(client: Client, make, rows: int) -> None:  # type: ignore[no-untyped-def]
    arr = make(np.random.default_rng(1).standard_normal((rows, 6)).astype(np.float32))
    out = client.infer("identity", arr)["output"]
    assert out.shape == arr.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


def test_echo_returns_many_named_inputs(client: Client) -> None:
    inputs = {f"t{i}": sample(dtype, (i, 2)) for i, dtype in enumerate(NUMPY_BY_WIRE.values())}
    out = client.infer("echo", inputs)
    assert list(out) == list(inputs)
    for name, arr in inputs.items():
        assert out[name].tobytes() == arr.tobytes() and out[name].dtype == arr.dtype


def test_results_belong_to_the_caller(client: Client) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    first = client.infer("identity", x)["output"]
    assert first.flags.writeable and first.flags.owndata
    first[:] = -1  # changing a result changes nothing on the server or in the input
    again = client.infer("identity", x)["output"]
    np.testing.assert_array_equal(again, np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(x, again)
    r = client.grad("mlp64", np.ones((2, 16)), grad_outputs=np.ones((2, 4)), param_grads=True)
    for arr in (*r.outputs.values(), *r.grads.values(), *r.param_grads.values()):
        assert arr.flags.writeable
    before = r.param_grads["layers.0.weight"].copy()
    r.param_grads["layers.0.weight"][:] = 0
    r2 = client.grad("mlp64", np.ones((2, 16)), grad_outputs=np.ones((2, 4)), param_grads=True)
    np.testing.assert_array_equal(r2.param_grads["layers.0.weight"], before)
