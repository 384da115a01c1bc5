"""Remote training through the client: the same loss curve and weights as local torch,
and checkpoints any safetensors reader loads."""

from __future__ import annotations

import asyncio
import gc
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from support.arrays import sample

import tensorwire as tw
from tensorwire import AsyncClient, Client, InvalidArgumentError, NotFoundError
from tensorwire import safetensors as st
from tensorwire_server.models.builtins import MLP

STEPS = 20
RNG = np.random.default_rng(7)
X = RNG.standard_normal((32, 16))
Y = np.sin(X @ RNG.standard_normal((16, 4)))

Optimizer = Callable[[Any], torch.optim.Optimizer]

CASES: dict[str, tuple[dict[str, Any], Optimizer]] = {
    "sgd-momentum": (
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    ),
    "sgd-nesterov": (
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.5, "nesterov": True},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, nesterov=True),
    ),
    "adam": (
        {"optimizer": "adam", "lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-7},
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-7),
    ),
}


def train_locally(make: Optimizer) -> tuple[list[float], dict[str, np.ndarray]]:
    """The built-in mlp64, trained here as the server trains it."""
    model = MLP(dtype=torch.float64)
    optimizer = make(model.parameters())
    losses = []
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_local_torch(client: Client, case: str) -> None:
    options, make = CASES[case]
    want_losses, want_state = train_locally(make)
    with client.trainer("mlp64", loss="mse", **options) as trainer:
        assert trainer.steps == 0 and trainer.model == "mlp64"
        assert [s.name for s in trainer.parameter_specs] == list(want_state)
        losses = [trainer.step(X, Y) for _ in range(STEPS)]
        assert trainer.steps == STEPS
        state = trainer.parameters()
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert list(state) == list(want_state)
    for name, value in want_state.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-8, atol=1e-10)


def test_remote_batches_train_as_arrays_do(client: Client) -> None:
    x, y = client.put(X), client.put(Y)
    with (
        client.trainer("mlp64", optimizer="sgd", lr=0.1) as a,
        client.trainer("mlp64", optimizer="sgd", lr=0.1) as b,
    ):
        for _ in range(3):
            assert a.step({"input": x}, y) == b.step({"input": X}, Y)
    client.free(x, y)


def test_save_writes_a_checkpoint_safetensors_reads(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "mlp64.safetensors"
    with client.trainer("mlp64", optimizer="adam", lr=1e-3) as trainer:
        trainer.step(X, Y)
        trainer.save(path)
        state = trainer.parameters()
    for loaded in (safetensors.numpy.load_file(path), safetensors.torch.load_file(path)):
        assert list(sorted(loaded)) == sorted(state)
        for name, value in state.items():
            np.testing.assert_array_equal(np.asarray(loaded[name]), value)
    with safetensors.safe_open(path, "np") as f:
        assert f.metadata() == {
            "format": "pt",
            "model": "mlp64",
            "optimizer": "adam",
            "loss": "mse",
            "steps": "1",
        }
    # A local copy loads it as it would any torch checkpoint.
    model = MLP(dtype=torch.float64)
    model.load_state_dict(safetensors.torch.load_file(path))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name])


# Every dtype the format has a code for (complex has none).
SAVED = [np.dtype(d) for d in st.CODES]


@pytest.mark.parametrize("dtype", SAVED, ids=str)
def test_our_writer_is_read_bit_exact_by_the_safetensors_package(
    tmp_path: Path, dtype: np.dtype
) -> None:
    tensors = {"a": sample(dtype, (3, 5)), "empty": sample(dtype, (0, 2)), "s": sample(dtype, ())}
    path = tmp_path / "t.safetensors"
    st.save(path, tensors, {"note": "hi"})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0 and json.loads(raw[8 : 8 + size])["__metadata__"] == {"note": "hi"}
    loaded = safetensors.torch.load_file(path)
    for name, arr in tensors.items():
        got = loaded[name]
        assert tuple(got.shape) == arr.shape
        # Compare bytes: NaN payloads and bfloat16 included.
        assert got.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == arr.tobytes()
    back, metadata = st.load(path)
    assert metadata == {"note": "hi"}
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype and back[name].tobytes() == arr.tobytes()
    # And what the package writes, we read (its NumPy writer has no bfloat16).
    if dtype != np.dtype(ml_dtypes.bfloat16):
        theirs = tmp_path / "theirs.safetensors"
        safetensors.numpy.save_file(tensors, theirs, {"by": "them"})
        back, metadata = st.load(theirs)
        assert metadata == {"by": "them"} and list(sorted(back)) == sorted(tensors)
        for name, arr in back.items():
            assert arr.dtype == dtype and arr.tobytes() == tensors[name].tobytes()


def test_complex_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no dtype"):
        st.save(tmp_path / "c.safetensors", {"z": np.zeros(2, np.complex64)})


def test_trainers_are_freed_like_tensors(address: str) -> None:
    with Client(address) as c:
        trainer = c.trainer("mlp64", optimizer="sgd", lr=0.1)
        assert c.session_info().trainers == (trainer.id,)
        trainer.free()
        assert c.session_info().trainers == ()
        with pytest.raises(NotFoundError, match="freed"):
            trainer.step(X, Y)
        dropped = c.trainer("mlp64", optimizer="sgd", lr=0.1)
        dropped.step(X, Y)
        del dropped
        gc.collect()
        info = c.session_info()
        assert info.trainers == () and info.bytes == 0


def test_bad_hyperparameters_are_the_servers_to_refuse(client: Client) -> None:
    info = client.info().sessions
    assert info is not None and "adam" in info.optimizers and "mse" in info.losses
    with pytest.raises(InvalidArgumentError):
        client.trainer("mlp64", optimizer="sgd", betas=(0.9, 0.99))  # adam's, not sgd's
    with pytest.raises(InvalidArgumentError):
        client.trainer("mlp64", optimizer="lbfgs")
    with pytest.raises(NotFoundError):
        client.trainer("no_such_model")


def test_async_training_matches_sync(client: Client, address: str) -> None:
    options, make = CASES["adam"]
    want_losses, want_state = train_locally(make)

    async def go() -> tuple[list[float], dict[str, np.ndarray]]:
        async with AsyncClient(address) as c, await c.trainer("mlp64", **options) as trainer:
            assert isinstance(trainer, tw.AsyncTrainer)
            losses = [await trainer.step(X, Y) for _ in range(STEPS)]
            return losses, await trainer.parameters()

    losses, state = asyncio.run(go())
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for name, value in want_state.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-8, atol=1e-10)
