"""Run programs: a short chain of functions and models run server-side in one call,
optionally differentiated end to end.

Arguments name the program's inputs and earlier steps' outputs with Refs; no step
can name code, and every step is an allowlisted function or a served model, so a
program is exactly as safe as the calls it chains. Gradients flow through models and
functions alike (on CUDA too), which torch.distributed.rpc's distributed autograd
cannot offer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tensorwire.errors import FailedPreconditionError, InvalidArgumentError, listed, shown
from tensorwire.wire.codec import Ref
from tensorwire.wire.protocol import MAX_PROGRAM_STEPS
from tensorwire_server.device.tensors import dtype_name, is_differentiable, to_device
from tensorwire_server.engine.binding import bind, invoke, name_outputs
from tensorwire_server.engine.engine import Engine, Export
from tensorwire_server.models.registry import Crossing
from tensorwire_server.named import Named


@dataclass(frozen=True)
class PlanStep:
    """One step of a plan: a function or a model, with arguments that may hold Refs."""

    name: str
    function: str = ""
    model: str = ""
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0


@dataclass(frozen=True)
class ProgramPlan:
    """A Run program as the server runs it: inputs by name, steps in order, the refs to
    return and what to differentiate."""

    inputs: Named[Any]
    steps: Sequence[PlanStep]
    outputs: Sequence[str] = ()
    loss: str = ""
    wrt: Sequence[str] = ()
    #: Refs kept in the caller's session (``run``'s ``keeper``) besides the outputs.
    kept: Sequence[str] = ()


@dataclass(frozen=True)
class ProgramOutcome:
    """The outputs by ref and the gradients by input name, exported; the refs in
    ``kept``, kept."""

    outputs: Named[Any]
    grads: Named[Any]
    kept: Named[Any] = field(default_factory=list)


def check(program: ProgramPlan) -> None:
    """Refuse a malformed program before anything runs: too many steps, duplicate
    or clashing names, refs to nothing or to later steps."""
    if not program.steps:
        raise InvalidArgumentError("a program needs at least one step")
    if len(program.steps) > MAX_PROGRAM_STEPS:
        raise InvalidArgumentError(
            f"a program has at most {MAX_PROGRAM_STEPS} steps, not {len(program.steps)}"
        )
    known: set[str] = set()
    for name, _ in program.inputs:
        if not name:
            raise InvalidArgumentError("every program input needs a name")
        _fresh(name, known, "input")
    for index, step in enumerate(program.steps):
        what = f"step {step.name!r}"
        if bool(step.function) == bool(step.model):
            raise InvalidArgumentError(f"{what} must name one function or one model")
        for ref in refs([step.args, list(step.kwargs.values())]):
            _known(ref.name, known, what)
        if "." in step.name:
            raise InvalidArgumentError(f"step name {shown(step.name)} must not contain '.'")
        _fresh(step.name, known, f"step {index}")
    for wanted in program.outputs:
        _known(wanted, known, "outputs")
    if program.loss:
        _known(program.loss, known, "loss")
    repeated: set[str] = set()
    for name in program.kept:
        _known(name, known, "kept")
        if name in repeated:
            raise InvalidArgumentError(f"kept names {shown(name)} twice")
        repeated.add(name)
    inputs = {name for name, _ in program.inputs}
    for name in program.wrt:
        if name not in inputs:
            raise InvalidArgumentError(
                f"wrt names {shown(name)}, which is not a program input; inputs: "
                f"{listed(inputs) or 'none'}"
            )
    if program.wrt and not program.loss:
        raise InvalidArgumentError("wrt needs a loss: the ref of a scalar to differentiate")


def run(
    engine: Engine, program: ProgramPlan, export: Export, keeper: Export | None = None
) -> ProgramOutcome:
    """Run ``program`` on ``engine``'s device; gradients of its loss when it has one.
    ``export`` makes the outputs and gradients, ``keeper`` the handles of ``kept``."""
    check(program)
    if program.kept and keeper is None:
        raise InvalidArgumentError("kept needs a session to keep the tensors in")
    differentiate = bool(program.loss)
    with engine.device_guard("program"):
        leaves = {name: to_device(t, engine.device) for name, t in program.inputs}
        wrt = list(program.wrt)
        if differentiate and not wrt:
            wrt = [n for n, t in leaves.items() if is_differentiable(t)]
        for name in wrt:
            if not is_differentiable(leaves[name]):
                raise FailedPreconditionError(
                    f"input {shown(name)} has dtype {dtype_name(leaves[name])}; "
                    "gradients need a floating point or complex input"
                )
        for name in wrt:
            leaves[name] = leaves[name].detach().requires_grad_(True)
        mode = torch.enable_grad() if differentiate else torch.no_grad()
        with mode:
            values = _Values(leaves)
            for step in program.steps:
                values.add(step.name, _run_step(engine, step, values))
            wanted = list(program.outputs) or _last_outputs(program, values)
            outputs = [(ref, values.get(ref, "outputs")) for ref in wanted]
            kept = [(ref, values.get(ref, "kept")) for ref in program.kept]
            grads: list[tuple[str, torch.Tensor]] = []
            if differentiate:
                grads = list(
                    zip(
                        wrt,
                        _gradients(engine, values.get(program.loss, "loss"), leaves, wrt),
                        strict=True,
                    )
                )
        return ProgramOutcome(
            outputs=[(ref, export(ref, t.detach())) for ref, t in outputs],
            grads=[(name, export(name, g)) for name, g in grads],
            kept=[(ref, keeper(ref, t.detach())) for ref, t in kept if keeper is not None],
        )


class _Values:
    """What refs can name: the inputs, and each step's named outputs so far."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = inputs
        self.steps: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def add(self, step: str, outputs: list[tuple[str, torch.Tensor]]) -> None:
        self.steps[step] = outputs

    def get(self, ref: str, what: str) -> torch.Tensor:
        if ref in self.inputs:
            return self.inputs[ref]
        step, _, output = ref.partition(".")
        named = self.steps[step]  # check() proved the step exists and ran before
        if not output:
            if len(named) != 1:
                raise InvalidArgumentError(
                    f"{what}: step {shown(step)} has outputs {listed(n for n, _ in named)}; "
                    f"name one as '{step}.<output>'"
                )
            return named[0][1]
        for name, tensor in named:
            if name == output:
                return tensor
        raise InvalidArgumentError(
            f"{what}: step {shown(step)} has no output {shown(output)}; its outputs: "
            f"{listed(n for n, _ in named)}"
        )

    def resolve(self, value: Any, what: str) -> Any:
        """An argument with every Ref replaced by the tensor it names."""
        if isinstance(value, Ref):
            return self.get(value.name, what)
        if isinstance(value, list):
            return [self.resolve(v, what) for v in value]
        return value


def _last_outputs(program: ProgramPlan, values: _Values) -> list[str]:
    """Refs to the last step's outputs: its name alone when it has one output."""
    last = program.steps[-1].name
    named = values.steps[last]
    return [last] if len(named) == 1 else [f"{last}.{n}" for n, _ in named]


def _run_step(engine: Engine, step: PlanStep, values: _Values) -> list[tuple[str, torch.Tensor]]:
    what = f"step {step.name!r}"
    args = [values.resolve(a, what) for a in step.args]
    kwargs = {k: values.resolve(v, what) for k, v in step.kwargs.items()}
    if step.function:
        function = engine.function(step.function)
        targs, tkwargs = engine.torch_arguments(args, kwargs)
        label = f"{what} (function {function.name!r})"
        result = engine.user_code(label, lambda: function(*targs, **tkwargs))
        return name_outputs(result, (), label)
    with _model(engine, step, args, kwargs) as (model, module, tensors, crossing):
        label = f"{what} (model {model.name!r})"
        result = engine.user_code(label, lambda: invoke(model, module, tensors))
        # The next steps read them on the program's (ambient) stream.
        return [(n, crossing.outward(t)) for n, t in name_outputs(result, model.outputs, label)]


@contextmanager
def _model(
    engine: Engine, step: PlanStep, args: list[Any], kwargs: dict[str, Any]
) -> Iterator[tuple[Any, torch.nn.Module, list[tuple[str, torch.Tensor]], Crossing]]:
    """The served model a step names, an instance of it held for the step, and the
    step's inputs bound to its signature on the instance's device."""
    if args and kwargs:
        raise InvalidArgumentError(
            f"step {step.name!r}: give a model's inputs in order (args) or by name "
            "(kwargs), not both"
        )
    given = [("", a) for a in args] or list(kwargs.items())
    for name, value in given:
        if not isinstance(value, torch.Tensor | np.ndarray):
            raise InvalidArgumentError(
                f"step {step.name!r}: model input {shown(name) if name else len(given)} "
                "must be a tensor"
            )
    with ExitStack() as stack:
        served = stack.enter_context(engine.registry.using(step.model, step.version))
        bound = bind(served.model, given)
        instance = stack.enter_context(served.alone(bound))
        crossing = stack.enter_context(instance.context())
        tensors = [(n, crossing.inward(to_device(t, instance.device))) for n, t in bound]
        yield served.model, instance.module, tensors, crossing


def _gradients(
    engine: Engine, loss: torch.Tensor, leaves: dict[str, torch.Tensor], wrt: list[str]
) -> tuple[torch.Tensor, ...]:
    if loss.numel() != 1:
        raise InvalidArgumentError(
            f"the loss must be a scalar, not a tensor of shape {list(loss.shape)}"
        )
    if not is_differentiable(loss):
        raise FailedPreconditionError(
            f"the loss has dtype {loss.dtype}; it cannot be differentiated"
        )
    sources = [leaves[n] for n in wrt]
    if not loss.requires_grad or not sources:  # nothing it depends on is differentiated
        return tuple(torch.zeros_like(s) for s in sources)
    return engine.user_code(  # type: ignore[no-any-return]
        "gradient of the program's loss",
        lambda: torch.autograd.grad(
            loss.reshape(()), sources, allow_unused=True, materialize_grads=True
        ),
    )


def _fresh(name: str, known: set[str], what: str) -> None:
    if name in known:
        raise InvalidArgumentError(f"{what}: the name {shown(name)} is already taken")
    known.add(name)


def _known(ref: str, known: set[str], what: str) -> None:
    if ref.partition(".")[0] not in known and ref not in known:
        raise InvalidArgumentError(
            f"{what}: ref {shown(ref)} names no input and no earlier step; known: "
            f"{listed(sorted(known)) or 'none'}"
        )


def no_refs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse Refs in a call's arguments: they name program values, and outside Run
    there are none."""
    if any(refs([list(args), list(kwargs.values())])):
        raise InvalidArgumentError("a ref argument is only valid inside a Run program")


def refs(values: Any) -> Iterator[Ref]:
    """Every Ref in an argument, at any depth of lists."""
    if isinstance(values, Ref):
        yield values
    elif isinstance(values, list | tuple):
        for value in values:
            yield from refs(value)
