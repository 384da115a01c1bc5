"""AsyncClient: the asyncio twin of Client, on grpc.aio, with the same methods."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar, overload

import numpy as np

from tensorwire._base import BaseClient
from tensorwire._flow import Flow, Locked
from tensorwire._messages import OPTIMIZER_OPTIONS
from tensorwire._session import SessionState
from tensorwire._transport.aio import AsyncTransport
from tensorwire.programs import Program
from tensorwire.remote import AsyncRemoteTensor, AsyncTrainer
from tensorwire.types import (
    USE_CLIENT_DEFAULT,
    GradResult,
    Inputs,
    ModelInfo,
    ProgramResult,
    ProgressCallback,
    RemoteGradResult,
    ServerInfo,
    SessionInfo,
    Timeout,
    VersionStatistics,
)
from tensorwire.wire.codec import Handle, Ref

T = TypeVar("T")


class AsyncClient(BaseClient[AsyncRemoteTensor, AsyncTrainer]):
    """A connection to a tensorwire server for asyncio code; ``async with`` it.

    Every method is the coroutine twin of ``Client``'s, with the same constructor
    arguments, results, errors and retries.
    """

    _TRANSPORT: ClassVar[type[AsyncTransport]] = AsyncTransport
    _transport: AsyncTransport

    def _remote_tensor(self, session: SessionState, handle: Handle) -> AsyncRemoteTensor:
        return AsyncRemoteTensor(self, session, handle)

    def _trainer(self, session: SessionState, id: str, **description: Any) -> AsyncTrainer:
        return AsyncTrainer(self, session, id, **description)

    @staticmethod
    def _new_lock() -> Any:
        return asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session (freeing its tensors and trainers on the server) and the
        channel; calls made afterwards raise RuntimeError."""
        if not self.closed:
            await self._drive(self._session.end())
            await self._transport.close()

    # ------------------------------------------------------------------ the loop

    async def _drive(self, flow: Flow[T]) -> T:
        """See ``Client._drive``."""
        try:
            step = flow.send(None)
            while True:
                try:
                    if isinstance(step, Locked):
                        async with self._session_lock:
                            result: Any = await self._drive(step.flow)
                    else:
                        result = await self._transport.invoke(step)
                except BaseException as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """See ``Client.info``."""
        return await self._drive(self._info_flow(timeout))

    @overload
    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = ...,
        version: int = ...,
        keep: Literal[False] = ...,
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
    ) -> dict[str, np.ndarray]: ...
    @overload
    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = ...,
        version: int = ...,
        keep: Literal[True],
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
    ) -> dict[str, AsyncRemoteTensor]: ...
    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        version: int = 0,
        keep: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray] | dict[str, AsyncRemoteTensor]:
        """See ``Client.infer``."""
        flow = self._infer_flow(model, inputs, outputs, version, keep, timeout, progress)
        return await self._drive(flow)

    @overload
    async def grad(
        self,
        model: str,
        inputs: Inputs,
        *,
        wrt: str | Sequence[str] | None = ...,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = ...,
        param_grads: bool = ...,
        version: int = ...,
        keep: Literal[False] = ...,
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
    ) -> GradResult: ...
    @overload
    async def grad(
        self,
        model: str,
        inputs: Inputs,
        *,
        wrt: str | Sequence[str] | None = ...,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = ...,
        param_grads: bool = ...,
        version: int = ...,
        keep: Literal[True],
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
    ) -> RemoteGradResult[AsyncRemoteTensor]: ...
    async def grad(
        self,
        model: str,
        inputs: Inputs,
        *,
        wrt: str | Sequence[str] | None = None,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        param_grads: bool = False,
        version: int = 0,
        keep: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> GradResult | RemoteGradResult[AsyncRemoteTensor]:
        """See ``Client.grad``."""
        return await self._drive(
            self._grad_flow(
                model, inputs, wrt, grad_outputs, param_grads, version, keep, timeout, progress
            )
        )

    @overload
    async def call(
        self,
        function: str,
        *args: Any,
        keep: Literal[False] = ...,
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, ...]: ...
    @overload
    async def call(
        self,
        function: str,
        *args: Any,
        keep: Literal[True],
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
        **kwargs: Any,
    ) -> AsyncRemoteTensor | tuple[AsyncRemoteTensor, ...]: ...
    async def call(
        self,
        function: str,
        *args: Any,
        keep: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, ...] | AsyncRemoteTensor | tuple[AsyncRemoteTensor, ...]:
        """See ``Client.call``."""
        return await self._drive(self._call_flow(function, args, kwargs, keep, timeout, progress))

    async def call_grad(
        self,
        function: str,
        *args: Any,
        wrt: int | Sequence[int] = 0,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> GradResult:
        """See ``Client.call_grad``."""
        flow = self._call_grad_flow(function, args, kwargs, wrt, grad_outputs, timeout, progress)
        return await self._drive(flow)

    async def model_statistics(
        self, model: str = "", version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> list[VersionStatistics]:
        """See ``Client.model_statistics``."""
        return await self._drive(self._model_statistics_flow(model, version, timeout))

    async def load_model(self, model: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """See ``Client.load_model``."""
        return await self._drive(self._load_model_flow(model, timeout))

    async def unload_model(
        self, model: str, version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """See ``Client.unload_model``."""
        await self._drive(self._unload_model_flow(model, version, timeout))

    # ------------------------------------------------------------------ remote tensors

    async def put(
        self,
        value: Any,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> AsyncRemoteTensor:
        """See ``Client.put``."""
        return await self._drive(self._put_flow(value, timeout, progress))

    async def get(
        self, tensor: AsyncRemoteTensor, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> np.ndarray:
        """See ``Client.get``."""
        return await self._drive(self._get_flow(tensor, timeout))

    async def free(
        self, *items: AsyncRemoteTensor | AsyncTrainer, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """See ``Client.free``."""
        await self._drive(self._free_flow(items, timeout))

    async def session_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SessionInfo:
        """See ``Client.session_info``."""
        return await self._drive(self._session_info_flow(timeout))

    # ------------------------------------------------------------------ programs

    @overload
    async def run(
        self,
        program: Program,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[Ref | str] | None = ...,
        loss: Ref | str | None = ...,
        wrt: Ref | str | Sequence[Ref | str] | None = ...,
        keep: Literal[False] = ...,
        kept: Sequence[Ref | str] | None = ...,
        timeout: Timeout = ...,
    ) -> ProgramResult[np.ndarray]: ...
    @overload
    async def run(
        self,
        program: Program,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[Ref | str] | None = ...,
        loss: Ref | str | None = ...,
        wrt: Ref | str | Sequence[Ref | str] | None = ...,
        keep: Literal[True],
        kept: Sequence[Ref | str] | None = ...,
        timeout: Timeout = ...,
    ) -> ProgramResult[AsyncRemoteTensor]: ...
    async def run(
        self,
        program: Program,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[Ref | str] | None = None,
        loss: Ref | str | None = None,
        wrt: Ref | str | Sequence[Ref | str] | None = None,
        keep: bool = False,
        kept: Sequence[Ref | str] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ProgramResult[np.ndarray] | ProgramResult[AsyncRemoteTensor]:
        """See ``Client.run``."""
        return await self._drive(
            self._run_flow(program, inputs, outputs, loss, wrt, keep, timeout, kept)
        )

    # ------------------------------------------------------------------ training

    async def trainer(
        self,
        model: str,
        *,
        optimizer: str = "adam",
        loss: str = "mse",
        version: int = 0,
        lr: float | None = None,
        momentum: float | None = None,
        dampening: float | None = None,
        weight_decay: float | None = None,
        nesterov: bool | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        amsgrad: bool | None = None,
        loss_options: Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AsyncTrainer:
        """See ``Client.trainer``."""
        values = (lr, momentum, dampening, weight_decay, nesterov, betas, eps, amsgrad)
        options = dict(zip(OPTIMIZER_OPTIONS, values, strict=True))
        flow = self._trainer_flow(model, version, optimizer, options, loss, loss_options, timeout)
        return await self._drive(flow)

    async def step(
        self,
        trainer: AsyncTrainer,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> float:
        """See ``Client.step``."""
        return await self._drive(self._step_flow(trainer, inputs, target, output, timeout))

    async def parameters(
        self, trainer: AsyncTrainer, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> dict[str, np.ndarray]:
        """See ``Client.parameters``."""
        return await self._drive(self._parameters_flow(trainer, timeout))
