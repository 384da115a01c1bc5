"""Remote tensors and trainers: what a client keeps on the server between calls.

They know their client only through the small protocols below (the methods Client and
AsyncClient offer for them), so this module imports neither twin.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any, NoReturn, Protocol, Self

import numpy as np

from tensorwire import safetensors
from tensorwire._session import Held, SessionState
from tensorwire.types import USE_CLIENT_DEFAULT, Inputs, TensorSpec, Timeout
from tensorwire.wire.codec import Handle
from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME


class SyncOwner(Protocol):
    """What RemoteTensor and Trainer need of their client (``Client`` has it)."""

    @property
    def closed(self) -> bool: ...
    def get(self, tensor: RemoteTensor, *, timeout: Timeout = ...) -> np.ndarray: ...
    def free(self, *items: RemoteTensor | Trainer, timeout: Timeout = ...) -> None: ...
    def step(
        self,
        trainer: Trainer,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = ...,
        timeout: Timeout = ...,
    ) -> float: ...
    def parameters(self, trainer: Trainer, *, timeout: Timeout = ...) -> dict[str, np.ndarray]: ...


class AsyncOwner(Protocol):
    """What AsyncRemoteTensor and AsyncTrainer need of their client (``AsyncClient``)."""

    @property
    def closed(self) -> bool: ...
    async def get(self, tensor: AsyncRemoteTensor, *, timeout: Timeout = ...) -> np.ndarray: ...
    async def free(
        self, *items: AsyncRemoteTensor | AsyncTrainer, timeout: Timeout = ...
    ) -> None: ...
    async def step(
        self,
        trainer: AsyncTrainer,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = ...,
        timeout: Timeout = ...,
    ) -> float: ...
    async def parameters(
        self, trainer: AsyncTrainer, *, timeout: Timeout = ...
    ) -> dict[str, np.ndarray]: ...


class _Freed:
    """Freed on the server by ``free()``, or when its ``with`` block ends."""

    _client: SyncOwner

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

    _client: AsyncOwner

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

    what = "tensor"

    def __init__(self, client: Any, session: SessionState, handle: Handle) -> None:
        self._client = client
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

    _client: SyncOwner

    def numpy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> np.ndarray:
        """Its data, fetched from the server."""
        return self._client.get(self, timeout=timeout)


class AsyncRemoteTensor(_AsyncFreed, _RemoteTensor):
    """The AsyncClient's RemoteTensor: ``await t.numpy()``, ``await t.free()``,
    ``async with``."""

    _client: AsyncOwner

    async def numpy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> np.ndarray:
        """Its data, fetched from the server."""
        return await self._client.get(self, timeout=timeout)


class _Trainer(Held):
    """What Trainer and AsyncTrainer share: the trainer's id and description."""

    what = "trainer"

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
        self._client = client
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

    _client: SyncOwner

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
        return self._client.step(self, inputs, target, output=output, timeout=timeout)

    def parameters(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[str, np.ndarray]:
        """The model's parameters and buffers now, by qualified name (its state_dict)."""
        return self._client.parameters(self, timeout=timeout)

    def save(self, path: str | os.PathLike[str], *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Write ``parameters()`` to ``path`` as a safetensors file (no torch needed),
        with the model, optimizer, loss and step count as its metadata."""
        safetensors.save(path, self.parameters(timeout=timeout), self._metadata())


class AsyncTrainer(_AsyncFreed, _Trainer):
    """The AsyncClient's Trainer: ``await`` its ``step``, ``parameters``, ``save`` and
    ``free``; ``async with``."""

    _client: AsyncOwner

    async def step(
        self,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> float:
        """See ``Trainer.step``."""
        return await self._client.step(self, inputs, target, output=output, timeout=timeout)

    async def parameters(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[str, np.ndarray]:
        """See ``Trainer.parameters``."""
        return await self._client.parameters(self, timeout=timeout)

    async def save(
        self, path: str | os.PathLike[str], *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """See ``Trainer.save``."""
        safetensors.save(path, await self.parameters(timeout=timeout), self._metadata())


__all__ = ["AsyncRemoteTensor", "AsyncTrainer", "RemoteTensor", "Trainer"]
