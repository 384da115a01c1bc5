"""Remote tensors, programs and trainers: what a client keeps on the server between calls."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, Self, TypeVar

import numpy as np

from tensorwire import safetensors
from tensorwire._base import USE_CLIENT_DEFAULT, Inputs, Timeout, ref_name
from tensorwire._session import Held, SessionState
from tensorwire.types import TensorSpec
from tensorwire.wire.codec import Handle, Ref
from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME
from tensorwire.wire.protocol import MAX_PROGRAM_STEPS

if TYPE_CHECKING:
    from tensorwire.aio import AsyncClient
    from tensorwire.client import Client


T = TypeVar("T")


class _Freed:
    """Freed on the server by ``free()``, or when its ``with`` block ends."""

    _client: Client

    def free(self) -> None:
        """Release it on the server; freeing twice is harmless."""
        self._client.free(self)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.free()


class _AsyncFreed:
    """Freed on the server by ``await free()``, or when its ``async with`` block ends."""

    _client: AsyncClient

    async def free(self) -> None:
        """Release it on the server; freeing twice is harmless."""
        await self._client.free(self)  # type: ignore[arg-type]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.free()


class _RemoteTensor(Held):
    """What RemoteTensor and AsyncRemoteTensor share: the handle and its description."""

    _what = "tensor"

    def __init__(self, client: Any, session: SessionState, handle: Handle) -> None:
        super().__init__(client, session, handle.id)
        #: The tensor's id, dtype name and shape on the server.
        self.handle = handle

    def __repr__(self) -> str:
        h = self.handle
        freed = ", freed" if self.freed else ""
        return f"{type(self).__name__}(id={h.id!r}, dtype={h.dtype}, shape={h.shape}{freed})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> NoReturn:
        # Without this NumPy would make an object array of it, silently.
        raise TypeError(f"{self!r} is held on the server: numpy() fetches its data")

    @property
    def id(self) -> str:
        """The handle's id in the session."""
        return self.handle.id

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self.handle.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The tensor's NumPy dtype (bfloat16 is ``ml_dtypes.bfloat16``)."""
        return NUMPY_BY_WIRE[WIRE_BY_NAME[self.handle.dtype]]

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return len(self.handle.shape)

    @property
    def size(self) -> int:
        """The number of elements."""
        return int(np.prod(self.handle.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """The bytes of its data."""
        return self.size * self.dtype.itemsize


class RemoteTensor(_Freed, _RemoteTensor):
    """A tensor held on the server in the client's session: ``Client.put`` makes one,
    and ``keep=True`` returns results as them. Pass it wherever a call takes an array;
    ``numpy()`` fetches its data. ``free()`` (or the end of a ``with`` block) releases
    it; one garbage collected is released on the client's next call."""

    _client: Client

    def numpy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> np.ndarray:
        """Its data, fetched from the server."""
        return self._client._get(self, timeout)


class AsyncRemoteTensor(_AsyncFreed, _RemoteTensor):
    """The AsyncClient's RemoteTensor: ``await t.numpy()``, ``await t.free()``,
    ``async with``."""

    _client: AsyncClient

    async def numpy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> np.ndarray:
        """Its data, fetched from the server."""
        return await self._client._get(self, timeout)


@dataclass(frozen=True)
class RemoteGradResult(Generic[T]):
    """``grad(..., keep=True)``: outputs and gradients as remote tensors, keyed as in
    GradResult."""

    outputs: dict[str, T]
    grads: dict[str, T]
    param_grads: dict[str, T] = field(default_factory=dict)


# ---------------------------------------------------------------------- programs


@dataclass(frozen=True)
class StepRef(Ref):
    """The results of a program step: as an argument, its only output; ``output(name)``
    one of several (``"U"`` of ``linalg.svd``, ``"output_1"`` of a tuple)."""

    def output(self, name: str) -> Ref:
        """A reference to this step's output ``name``."""
        return Ref(f"{self.name}.{name}")


@dataclass(frozen=True)
class _Step:
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
        self._steps: list[_Step] = []

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
        self._steps.append(_Step(name, function, model, args, dict(kwargs), version))
        return StepRef(name)

    def _check_name(self, name: str, what: str) -> None:
        if not name or "." in name:
            raise ValueError(f"{what} name {name!r}: names are non-empty and have no '.'")
        if name in self._inputs or name in self.steps:
            raise ValueError(f"{what} name {name!r} is taken in this program")

    def _check_inputs(self, given: Mapping[str, Any]) -> None:
        missing = [n for n in self._inputs if n not in given]
        unknown = [n for n in given if n not in self._inputs]
        if missing or unknown:
            raise ValueError(
                f"program inputs are {self._inputs}; "
                + "; ".join(
                    text
                    for text in (
                        f"missing {missing}" if missing else "",
                        f"unknown {unknown}" if unknown else "",
                    )
                    if text
                )
            )
        if not self._steps:
            raise ValueError("the program has no steps")


def _refs(value: Any) -> Iterator[Ref]:
    """Every Ref in ``value``, through tuples, lists and dict values."""
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _refs(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _refs(item)


@dataclass(frozen=True)
class ProgramResult(Generic[T]):
    """What ``run`` returns: ``outputs`` named by their refs (``result[ref]`` reads
    one) and the loss's gradients named as in ``wrt``."""

    outputs: dict[str, T]
    grads: dict[str, T] = field(default_factory=dict)

    def __getitem__(self, ref: Ref | str) -> T:
        return self.outputs[ref_name(ref)]


# ---------------------------------------------------------------------- training

#: Optimizer hyperparameters by their torch names, as ``Client.trainer`` takes them.
OPTIMIZER_OPTIONS: Final = (
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "nesterov",
    "betas",
    "eps",
    "amsgrad",
)


class _Trainer(Held):
    """What Trainer and AsyncTrainer share: the trainer's id and description."""

    _what = "trainer"

    def __init__(
        self,
        client: Any,
        session: SessionState,
        id: str,
        *,
        model: str,
        optimizer: str,
        loss: str,
        parameters: tuple[TensorSpec, ...],
        nbytes: int,
    ) -> None:
        super().__init__(client, session, id)
        #: The trainer's id in the session.
        self.id = id
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        #: The trainable parameters by qualified name, with dtype and shape.
        self.parameter_specs = parameters
        #: Device memory the trainer held when made (optimizer state comes at step 1).
        self.nbytes = nbytes
        #: Steps taken so far, as the server counts them.
        self.steps = 0

    def __repr__(self) -> str:
        freed = ", freed" if self.freed else ""
        return (
            f"{type(self).__name__}(id={self.id!r}, model={self.model!r}, "
            f"optimizer={self.optimizer!r}, loss={self.loss!r}, steps={self.steps}{freed})"
        )

    def _metadata(self) -> dict[str, str]:
        return {
            "format": "pt",
            "model": self.model,
            "optimizer": self.optimizer,
            "loss": self.loss,
            "steps": str(self.steps),
        }


class Trainer(_Freed, _Trainer):
    """A trainable copy of a model in the client's session (``Client.trainer``), with
    its optimizer and loss; ``step`` runs one training step on a batch. ``free()`` (or
    the end of a ``with`` block) releases it; one garbage collected is released on the
    client's next call."""

    _client: Client

    def step(
        self,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> float:
        """One step: forward ``inputs`` (as ``infer`` takes them: arrays or remote
        tensors), the loss of the model's output (or its ``output``) against
        ``target``, backward, optimizer step; the loss before the step."""
        return self._client._step(self, inputs, target, output, timeout)

    def parameters(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[str, np.ndarray]:
        """The model's parameters and buffers now, by qualified name (its state_dict)."""
        return self._client._parameters(self, timeout)

    def save(self, path: str | os.PathLike[str], *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Write ``parameters()`` to ``path`` as a safetensors file (no torch needed),
        with the model, optimizer, loss and step count as its metadata."""
        safetensors.save(path, self.parameters(timeout=timeout), self._metadata())


class AsyncTrainer(_AsyncFreed, _Trainer):
    """The AsyncClient's Trainer: ``await`` its ``step``, ``parameters``, ``save`` and
    ``free``; ``async with``."""

    _client: AsyncClient

    async def step(
        self,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> float:
        """See ``Trainer.step``."""
        return await self._client._step(self, inputs, target, output, timeout)

    async def parameters(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[str, np.ndarray]:
        """See ``Trainer.parameters``."""
        return await self._client._parameters(self, timeout)

    async def save(
        self, path: str | os.PathLike[str], *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """See ``Trainer.save``."""
        safetensors.save(path, await self.parameters(timeout=timeout), self._metadata())


__all__ = [
    "AsyncRemoteTensor",
    "AsyncTrainer",
    "Program",
    "ProgramResult",
    "RemoteGradResult",
    "RemoteTensor",
    "StepRef",
    "Trainer",
]
