"""One caller's session as the service uses it: tensors placed on the device and kept
under the session's quota (Put, Get, Free, results kept as handles), and trainers.

``sessions`` stores and counts; this places, copies and trains. Nothing here knows a
transport: the service hands a Workspace out for the session a call names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from tensorwire.errors import NotFoundError, shown
from tensorwire.wire.codec import Handle
from tensorwire_server.core import training
from tensorwire_server.core.sessions import Session, SessionSummary
from tensorwire_server.core.training import TrainingState
from tensorwire_server.device.tensors import dtype_name, to_device
from tensorwire_server.engine import programs
from tensorwire_server.engine.engine import Engine, as_array
from tensorwire_server.models.model import IOSpec
from tensorwire_server.named import Named


class Workspace:
    """``session``'s tensors and trainers, on ``engine``'s device."""

    def __init__(self, engine: Engine, session: Session) -> None:
        self.engine = engine
        self.session = session

    def keep(self, _name: str, tensor: torch.Tensor) -> Handle:
        """Keep a result in the session: an Export giving handles instead of arrays."""
        return self.session.keep(tensor)

    def tensor(self, handle: str, what: str) -> torch.Tensor:
        """The tensor ``handle`` names; NOT_FOUND if the session has none such."""
        return self.session.tensor(handle, what)

    def put(self, value: np.ndarray | torch.Tensor, private: bool = False) -> Handle:
        """Place ``value`` (an array, or a tensor the session holds) on the device and
        keep it; its handle. ``private``: the array's buffer is the request's own (a
        streamed one's) and is kept as it is, not copied."""
        engine = self.engine
        with engine.device_guard("Put"):
            tensor = to_device(value, engine.device)
            if isinstance(value, torch.Tensor):
                tensor = tensor.clone()  # a handle's copy, not a second name for it
            return self.session.keep(tensor, private=private)

    def get(self, handle: str) -> np.ndarray:
        """The tensor ``handle`` names, as a NumPy array of the caller's own."""
        tensor = self.session.tensor(handle, "Get")
        with self.engine.device_guard("Get"):
            return as_array(handle, tensor)

    def free(self, ids: Iterable[str], missing_ok: bool = False) -> int:
        """Free handles and trainers; the bytes freed (``missing_ok``: ids the session
        does not hold are no error)."""
        return self.session.free(ids, missing_ok)

    def summary(self) -> SessionSummary:
        """What the session holds."""
        return self.session.summary()

    def create_trainer(
        self,
        model: str,
        version: int,
        optimizer: str,
        options: Mapping[str, Any],
        loss: str,
        loss_options: Mapping[str, Any],
    ) -> HeldTrainer:
        """A trainable copy of ``model`` (``version``; 0: the newest) with an allowlisted
        optimizer (empty: sgd) and loss, held in the session."""
        programs.no_refs([], {**options, **loss_options})
        engine = self.engine
        copying = f"copying model {model!r} for training"
        with engine.registry.using(model, version) as served, engine.device_guard(copying):
            state = TrainingState(
                served.model,
                served.instances[0].module,
                engine.device,
                optimizer or "sgd",
                options,
                loss,
                {k: engine.torch_value(v) for k, v in loss_options.items()},
            )
        return HeldTrainer(self, self.session.hold("trainer", state), state)

    def trainer(self, trainer_id: str) -> HeldTrainer:
        """The trainer ``trainer_id``; NOT_FOUND if the session holds none such."""
        state = self.session.holding(trainer_id, "trainer")
        if not isinstance(state, TrainingState):
            raise NotFoundError(f"{shown(trainer_id)} is not a trainer")
        return HeldTrainer(self, trainer_id, state)


class HeldTrainer:
    """A TrainingState a session holds under ``id``, its growth counted in the quota."""

    def __init__(self, workspace: Workspace, trainer_id: str, state: TrainingState) -> None:
        self.workspace = workspace
        self.id = trainer_id
        self.state = state

    @property
    def bytes(self) -> int:
        """Device bytes the trainer holds."""
        return self.state.bytes

    def specs(self) -> list[IOSpec]:
        """The trainable parameters' names, dtypes and shapes."""
        return [IOSpec(n, dtype_name(p), tuple(p.shape)) for n, p in self.state.parameters]

    def step(self, inputs: Named[Any], target: Any, output: str = "") -> tuple[float, int]:
        """One training step on ``inputs`` toward ``target`` (``output``: the model output
        the loss reads); the loss before the step and the steps taken so far."""
        state = self.state
        loss, steps = training.step(self.workspace.engine, state, inputs, target, output)
        self.workspace.session.resize(self.id, lambda: state.bytes)
        return loss, steps

    def parameters(self, keep: bool = False) -> Named[Any]:
        """Parameters and buffers by name: arrays, or (``keep``) handles to copies."""
        state = self.state
        with state.lock, self.workspace.engine.device_guard("Parameters"):
            if not keep:
                return [(n, as_array(n, t)) for n, t in state.state()]
            # Copies: a handle must not follow the parameter as training goes on.
            return [(n, self.workspace.keep(n, t.clone())) for n, t in state.state()]
