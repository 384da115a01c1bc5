"""Programs: a short chain of Call functions and models, built on the client and run on
the server in one round trip by ``Client.run``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tensorwire.wire.codec import Ref
from tensorwire.wire.protocol import MAX_PROGRAM_STEPS


@dataclass(frozen=True)
class StepRef(Ref):
    """The results of a program step: as an argument, its only output; ``output(name)``
    one of several (``"U"`` of ``linalg.svd``, ``"output_1"`` of a tuple)."""

    def output(self, name: str) -> Ref:
        """A reference to this step's output ``name``."""
        return Ref(f"{self.name}.{name}")


@dataclass(frozen=True)
class ProgramStep:
    """One step of a Program as it travels: a function or a model (the other empty),
    its arguments (refs, arrays, remote tensors, plain values) and the model version."""

    name: str
    function: str
    model: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    version: int


class Program:
    """A short chain of Call functions and models run on the server in one round trip
    by ``Client.run``, with the gradient of a scalar result if asked.

    ``input(name)`` declares a tensor ``run`` supplies; ``call`` and ``infer`` add a
    step whose arguments may be those refs, earlier steps' refs, arrays or plain values,
    and return a ref to its results. Steps are named ``s0``, ``s1``, ... unless given
    a ``name``; outputs come back named by their refs (``"s2"``, ``"s1.U"``)."""

    def __init__(self) -> None:
        self._inputs: list[str] = []
        self._steps: list[ProgramStep] = []

    def __repr__(self) -> str:
        steps = ", ".join(f"{s.name}={s.function or s.model}" for s in self._steps)
        return f"Program(inputs={self._inputs}, steps=[{steps}])"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The declared input names, in order."""
        return tuple(self._inputs)

    @property
    def steps(self) -> tuple[str, ...]:
        """The step names, in order."""
        return tuple(s.name for s in self._steps)

    @property
    def calls(self) -> tuple[ProgramStep, ...]:
        """The steps themselves, in order: what ``run`` sends."""
        return tuple(self._steps)

    def input(self, name: str) -> Ref:
        """Declare an input tensor; ``run`` supplies it by ``name``."""
        self._check_name(name, "input")
        self._inputs.append(name)
        return Ref(name)

    def call(self, function: str, *args: Any, name: str | None = None, **kwargs: Any) -> StepRef:
        """Add a step running the Call function ``function`` (as ``Client.call``)."""
        return self._add(name, function, "", args, kwargs, 0)

    def infer(
        self, model: str, *args: Any, version: int = 0, name: str | None = None, **kwargs: Any
    ) -> StepRef:
        """Add a step running ``model`` (its newest version, or ``version``) on inputs
        given in order (``args``) or by name (``kwargs``)."""
        return self._add(name, "", model, args, kwargs, version)

    def check_inputs(self, given: Mapping[str, Any]) -> None:
        """ValueError unless ``given`` names exactly the declared inputs and the
        program has a step to run."""
        missing = [n for n in self._inputs if n not in given]
        unknown = [n for n in given if n not in self._inputs]
        if missing or unknown:
            problems = [f"missing {missing}"] if missing else []
            problems += [f"unknown {unknown}"] if unknown else []
            raise ValueError(f"program inputs are {self._inputs}; " + "; ".join(problems))
        if not self._steps:
            raise ValueError("the program has no steps")

    def _add(
        self,
        name: str | None,
        function: str,
        model: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        version: int,
    ) -> StepRef:
        if len(self._steps) >= MAX_PROGRAM_STEPS:
            raise ValueError(f"a program has at most {MAX_PROGRAM_STEPS} steps")
        name = f"s{len(self._steps)}" if name is None else name
        self._check_name(name, "step")
        where = f"step {name!r} ({function or model})"
        for ref in _refs((args, kwargs)):
            base = ref.name.partition(".")[0]
            if base not in self._inputs and base not in self.steps:
                raise ValueError(
                    f"{where}: {ref.name!r} is neither an input of this program nor an earlier step"
                )
        self._steps.append(ProgramStep(name, function, model, args, dict(kwargs), version))
        return StepRef(name)

    def _check_name(self, name: str, what: str) -> None:
        if not name or "." in name:
            raise ValueError(f"{what} name {name!r}: names are non-empty and have no '.'")
        if name in self._inputs or name in self.steps:
            raise ValueError(f"{what} name {name!r} is taken in this program")


def leaves(value: Any) -> Iterator[Any]:
    """Every value inside ``value`` that is not a list, tuple or mapping: the
    arguments a call's nested lists and dicts hold."""
    if isinstance(value, list | tuple):
        items: Iterable[Any] = value
    elif isinstance(value, Mapping):
        items = value.values()
    else:
        yield value
        return
    for item in items:
        # A leaf is yielded here, not by a generator of its own (one per argument).
        if isinstance(item, list | tuple | Mapping):
            yield from leaves(item)
        else:
            yield item


def _refs(value: Any) -> Iterator[Ref]:
    """Every Ref in ``value``, through tuples, lists and dict values."""
    return (leaf for leaf in leaves(value) if isinstance(leaf, Ref))
