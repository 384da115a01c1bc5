"""Remote training: a trainable copy of a model, an allowlisted loss and optimizer.

A TrainingState lives in a client's session, driven by the client's Trainer. Each step
runs forward, the loss, backward and one optimizer step on the session's device; the
client reads the parameters back.
The losses are the Call allowlist's own entries (with their argument checks), and
the optimizers take only the hyperparameters named here: nothing from the wire is
executed or unpickled.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch

from tensorwire.errors import FailedPreconditionError, InvalidArgumentError, listed, shown
from tensorwire_server.core.sessions import storage_bytes
from tensorwire_server.device.tensors import to_device
from tensorwire_server.engine.binding import bind, invoke, name_outputs
from tensorwire_server.engine.engine import Engine
from tensorwire_server.engine.functions import FUNCTIONS, Function
from tensorwire_server.models.model import Model, trainable
from tensorwire_server.named import Named

#: Loss name -> the allowlisted function it runs (input first, target second).
LOSSES: Final[Mapping[str, Function]] = {
    name: FUNCTIONS[f"nn.functional.{function}"]
    for name, function in (
        ("mse", "mse_loss"),
        ("l1", "l1_loss"),
        ("smooth_l1", "smooth_l1_loss"),
        ("huber", "huber_loss"),
        ("cross_entropy", "cross_entropy"),
        ("nll", "nll_loss"),
        ("binary_cross_entropy_with_logits", "binary_cross_entropy_with_logits"),
        ("kl_div", "kl_div"),
    )
}


@dataclass(frozen=True)
class OptimizerKind:
    """An allowlisted optimizer and the hyperparameters it takes, with their types."""

    make: Callable[..., torch.optim.Optimizer]
    options: Mapping[str, type]


_ADAM_OPTIONS: Final = {
    "lr": float,
    "betas": tuple,
    "eps": float,
    "weight_decay": float,
    "amsgrad": bool,
}
OPTIMIZERS: Final[Mapping[str, OptimizerKind]] = {
    "sgd": OptimizerKind(
        torch.optim.SGD,
        {
            "lr": float,
            "momentum": float,
            "dampening": float,
            "weight_decay": float,
            "nesterov": bool,
        },
    ),
    "adam": OptimizerKind(torch.optim.Adam, _ADAM_OPTIONS),
    "adamw": OptimizerKind(torch.optim.AdamW, _ADAM_OPTIONS),
}


def optimizer_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against optimizer ``name``'s hyperparameters and types."""
    kind = OPTIMIZERS.get(name)
    if kind is None:
        raise InvalidArgumentError(
            f"optimizer {shown(name)} is not available; choose {listed(OPTIMIZERS)}"
        )
    checked: dict[str, Any] = {}
    for key, value in options.items():
        want = kind.options.get(key)
        if want is None:
            raise InvalidArgumentError(
                f"optimizer {name!r} takes no option {shown(key)}; it takes {listed(kind.options)}"
            )
        checked[key] = _typed(f"optimizer option {key!r}", value, want)
    return checked


def _typed(what: str, value: Any, want: type) -> Any:
    if want is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{what} must be a bool")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgumentError(f"{what} must be a number")
        if not float(value) == float(value) or float(value) < 0:  # NaN or negative
            raise InvalidArgumentError(f"{what} must be a non-negative number, not {value}")
        return float(value)
    # betas: two numbers in [0, 1)
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(0 <= v < 1 for v in value)
    ):
        raise InvalidArgumentError(f"{what} must be two numbers in [0, 1)")
    return (float(value[0]), float(value[1]))


class TrainingState:
    """A trainable copy of one model on one device, its optimizer and its loss."""

    def __init__(
        self,
        model: Model,
        module: torch.nn.Module,
        device: torch.device,
        optimizer: str,
        options: Mapping[str, Any],
        loss: str,
        loss_options: Mapping[str, Any],
    ) -> None:
        if loss not in LOSSES:
            raise InvalidArgumentError(
                f"loss {shown(loss)} is not available; choose {listed(LOSSES)}"
            )
        for key in ("input", "target", "out"):
            if key in loss_options:
                raise InvalidArgumentError(f"loss option {key!r} is not allowed")
        if model.inference_only:
            raise FailedPreconditionError(
                f"model {model.name!r} cannot be trained: {model.inference_only}"
            )
        checked = optimizer_options(optimizer, options)
        self.model = model
        self.device = device
        self.loss_name = loss
        self.loss = LOSSES[loss]
        self.loss_options = dict(loss_options)
        try:
            copied = copy.deepcopy(module)
        except Exception as exc:
            raise FailedPreconditionError(
                f"model {model.name!r} cannot be copied for training: {exc}"
            ) from exc
        self.module = copied.to(device)
        self.module.train()
        self.parameters = list(trainable(self.module))
        if not self.parameters:
            raise FailedPreconditionError(f"model {model.name!r} has no trainable parameters")
        try:
            self.optimizer = OPTIMIZERS[optimizer].make([p for _, p in self.parameters], **checked)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"optimizer {optimizer!r}: {exc}") from exc
        self.steps = 0
        #: One step at a time: two concurrent steps would interleave their updates.
        self.lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """Device bytes held: the module's tensors, gradients and optimizer state."""
        seen: set[int] = set()
        total = 0
        tensors: list[torch.Tensor] = [*self.module.parameters(), *self.module.buffers()]
        tensors += [p.grad for p in self.module.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage_bytes(tensor)
        return total

    def state(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters and buffers by qualified name, as in the module's state_dict."""
        return [(name, t.detach()) for name, t in self.module.state_dict().items()]


def step(
    engine: Engine, trainer: TrainingState, inputs: Named[Any], target: Any, output: str = ""
) -> tuple[float, int]:
    """One training step: forward, loss, backward, optimizer step. The loss before
    the step, and the steps taken so far."""
    model = trainer.model
    what = f"training {model.name!r}"
    bound = bind(model, inputs)
    with trainer.lock, engine.device_guard(what), torch.enable_grad():
        tensors = [(n, to_device(t, trainer.device)) for n, t in bound]
        goal = to_device(target, trainer.device)
        result = engine.user_code(what, lambda: invoke(model, trainer.module, tensors))
        named = dict(name_outputs(result, model.outputs, what))
        if not output:
            if len(named) != 1:
                raise InvalidArgumentError(
                    f"model {model.name!r} has outputs {listed(named)}; name the one the "
                    "loss reads (output)"
                )
            output = next(iter(named))
        if output not in named:
            raise InvalidArgumentError(
                f"model {model.name!r} has no output {shown(output)}; outputs: {listed(named)}"
            )
        predicted = named[output]
        loss = engine.user_code(
            f"loss {trainer.loss_name!r}",
            lambda: trainer.loss(predicted, goal, **trainer.loss_options),
        )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InvalidArgumentError(
                f"loss {trainer.loss_name!r} gave a tensor of shape "
                f"{list(getattr(loss, 'shape', []))}, not a scalar: use reduction 'mean' or 'sum'"
            )
        trainer.optimizer.zero_grad(set_to_none=True)
        engine.user_code(f"backward pass of {what}", loss.backward)
        engine.user_code(f"optimizer step of {what}", trainer.optimizer.step)
        trainer.steps += 1
        return float(loss.detach().item()), trainer.steps
