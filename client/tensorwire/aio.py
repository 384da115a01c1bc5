"""AsyncClient: the asyncio twin of Client, on grpc.aio, with the same methods."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, overload

import grpc
import grpc.aio
import numpy as np

from tensorwire._base import (
    SESSION_CALL_TIMEOUT,
    USE_CLIENT_DEFAULT,
    BaseClient,
    Inputs,
    Timeout,
    _Call,
    _kept,
    _owned,
    _Retry,
    _spec,
    _Via,
)
from tensorwire._session import SessionState
from tensorwire.errors import NotFoundError, TensorwireError
from tensorwire.remote import (
    OPTIMIZER_OPTIONS,
    AsyncRemoteTensor,
    AsyncTrainer,
    Program,
    ProgramResult,
    RemoteGradResult,
)
from tensorwire.types import (
    GradResult,
    ModelInfo,
    ProgressCallback,
    ServerInfo,
    SessionInfo,
    VersionStatistics,
)
from tensorwire.wire.codec import Encoder, Handle, Received, Ref


class AsyncClient(BaseClient):
    """A connection to a tensorwire server for asyncio code; ``async with`` it.

    Every method is the coroutine twin of ``Client``'s, with the same constructor
    arguments, results, errors and retries.
    """

    _GRPC: ClassVar[Any] = grpc.aio

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
        if not self._closed:
            await self._end_session()
            self._closed = True
            for channel in self._channels():
                await channel.close(grace=None)

    async def _invoke(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None = None,
        via: _Via | None = None,
    ) -> Received[Any]:
        call = self._begin(method, encoder, timeout, progress, via)
        while True:
            try:
                return await self._attempt(call)
            except _Retry as retry:
                await asyncio.sleep(retry.delay)

    async def _attempt(self, call: _Call) -> Received[Any]:
        self._next_attempt(call)
        if not call.streamed:
            try:
                result = await call.methods[call.method](
                    call.encoder.finish(), timeout=call.remaining(), metadata=call.metadata
                )
            except grpc.RpcError as exc:
                self._unary_failed(call, exc)  # returns only to ask again as a stream
            else:
                return self._unary_done(call, result)
        return await self._stream(call)

    async def _stream(self, call: _Call) -> Received[Any]:
        parts, receiver = self._stream_parts(call)
        rpc = call.methods[f"{call.method}Stream"](
            parts, timeout=call.remaining(), metadata=call.metadata
        )
        try:
            async for raw in rpc:
                call.responded = True
                receiver.feed(raw)
            return receiver.finish()
        except BaseException as exc:
            rpc.cancel()  # whatever went wrong, stop the server's work too
            self._stream_failed(call, exc)

    async def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """See ``Client.info``."""
        return self._finish_info(await self._invoke("Info", self._prepare_info(), timeout))

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
        stateful = self._uses_session(inputs) or keep
        request = self._prepare_infer(model, inputs, outputs, version, keep)
        if not stateful:
            return self._finish_infer(await self._invoke("Infer", request, timeout, progress))
        session, received = await self._stateful("Infer", request, timeout, progress, keep=keep)
        if keep:
            return self._remotes(session, _kept(received, received.message.outputs))
        return self._finish_infer(received)

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
        stateful = self._uses_session(inputs, grad_outputs) or keep
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads, version, keep)
        if not stateful:
            return self._finish_grad(await self._invoke("Grad", request, timeout, progress))
        session, received = await self._stateful("Grad", request, timeout, progress, keep=keep)
        if not keep:
            return self._finish_grad(received)
        m = received.message
        return RemoteGradResult(
            outputs=self._remotes(session, _kept(received, m.outputs)),
            grads=self._remotes(session, _kept(received, m.grads)),
            param_grads=self._remotes(session, _kept(received, m.param_grads)),
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
        stateful = self._uses_session(args, kwargs) or keep
        request = self._prepare_call(function, args, kwargs, keep)
        if not stateful:
            return self._finish_call(await self._invoke("Call", request, timeout, progress))
        session, received = await self._stateful("Call", request, timeout, progress, keep=keep)
        if not keep:
            return self._finish_call(received)
        kept = tuple(self._remotes(session, _kept(received, received.message.outputs)).values())
        return kept[0] if len(kept) == 1 else kept

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
        stateful = self._uses_session(args, kwargs, grad_outputs)
        request = self._prepare_call_grad(function, args, kwargs, wrt, grad_outputs)
        if not stateful:
            return self._finish_grad(await self._invoke("Grad", request, timeout, progress))
        return self._finish_grad((await self._stateful("Grad", request, timeout, progress))[1])

    async def model_statistics(
        self, model: str = "", version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> list[VersionStatistics]:
        """See ``Client.model_statistics``."""
        request = self._prepare_model_statistics(model, version)
        received = await self._invoke("ModelStatistics", request, timeout)
        return self._finish_model_statistics(received)

    async def load_model(self, model: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """See ``Client.load_model``."""
        request = self._prepare_load_model(model)
        return self._finish_load_model(await self._invoke("Load", request, timeout))

    async def unload_model(
        self, model: str, version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """See ``Client.unload_model``."""
        request = self._prepare_unload_model(model, version)
        self._finish_unload_model(await self._invoke("Unload", request, timeout))

    # ------------------------------------------------------------------ remote tensors

    async def put(
        self,
        value: Any,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> AsyncRemoteTensor:
        """See ``Client.put``."""
        self._uses_session(value)
        request = self._prepare_put(value)
        session, received = await self._stateful("Put", request, timeout, progress)
        return AsyncRemoteTensor(self, session, self._finish_put(received))

    async def free(
        self, *items: AsyncRemoteTensor | AsyncTrainer, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """See ``Client.free``."""
        session, ids = self._to_free(items)
        if session is not None:
            await self._free_ids(session, [*session.take_pending(), *ids], timeout)

    async def session_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SessionInfo:
        """See ``Client.session_info``."""
        request = self._prepare_describe_session()
        received = (await self._stateful("DescribeSession", request, timeout))[1]
        return self._finish_describe_session(received)

    async def _get(self, tensor: AsyncRemoteTensor, timeout: Timeout) -> np.ndarray:
        """The data of ``tensor`` (``AsyncRemoteTensor.numpy``)."""
        tensor._usable(self)
        stream = tensor.nbytes >= self.stream_threshold
        request = self._prepare_get(tensor.handle)
        return self._finish_get((await self._stateful("Get", request, timeout, stream=stream))[1])

    def _remotes(
        self, session: SessionState, handles: list[tuple[str, Handle]]
    ) -> dict[str, AsyncRemoteTensor]:
        return {name: AsyncRemoteTensor(self, session, handle) for name, handle in handles}

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
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ProgramResult[np.ndarray] | ProgramResult[AsyncRemoteTensor]:
        """See ``Client.run``."""
        self._uses_session(inputs, [(s.args, s.kwargs) for s in program._steps])
        request = self._prepare_run(program, inputs, outputs, loss, wrt, keep)
        session, received = await self._stateful("Run", request, timeout, keep=keep)
        m = received.message
        if keep:
            return ProgramResult(
                self._remotes(session, _kept(received, m.outputs)),
                self._remotes(session, _kept(received, m.grads)),
            )
        return ProgramResult(_owned(received, m.outputs), _owned(received, m.grads))

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
        request = self._prepare_trainer(model, version, optimizer, options, loss, loss_options)
        session, received = await self._stateful("CreateTrainer", request, timeout)
        m = received.message
        return AsyncTrainer(
            self,
            session,
            m.trainer,
            model=model,
            optimizer=optimizer,
            loss=loss,
            parameters=tuple(_spec(p) for p in m.parameters),
            nbytes=m.bytes,
        )

    async def _step(
        self,
        trainer: AsyncTrainer,
        inputs: Inputs,
        target: Any,
        output: str | None,
        timeout: Timeout,
    ) -> float:
        """One training step (``AsyncTrainer.step``)."""
        trainer._usable(self)
        self._uses_session(inputs, target)
        request = self._prepare_step(trainer.id, inputs, target, output)
        m = (await self._stateful("Step", request, timeout))[1].message
        trainer.steps = int(m.step)
        return float(m.loss)

    async def _parameters(self, trainer: AsyncTrainer, timeout: Timeout) -> dict[str, np.ndarray]:
        """A trainer's parameters (``AsyncTrainer.parameters``)."""
        trainer._usable(self)
        request = self._prepare_parameters(trainer.id)
        return self._finish_parameters((await self._stateful("Parameters", request, timeout))[1])

    # ------------------------------------------------------------------ the session

    async def _stateful(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None = None,
        *,
        keep: bool = False,
        stream: bool = False,
    ) -> tuple[SessionState, Received[Any]]:
        """See ``Client._stateful``."""
        session = await self._open_session(timeout)
        via = self._via(session, idempotent=False if keep else None, stream=stream)
        try:
            return session, await self._invoke(method, encoder, timeout, progress, via)
        except NotFoundError as exc:
            if await self._session_exists(session):
                raise
            raise self._session_lost(session) from exc

    async def _open_session(self, timeout: Timeout) -> SessionState:
        """See ``Client._open_session``."""
        session = self._session
        if session is None:
            async with self._session_lock:
                session = self._session
                if session is None:
                    request = self._prepare_open_session()
                    via = self._via(None)
                    received = await self._invoke("OpenSession", request, timeout, None, via)
                    session = self._session = self._finish_open_session(received)
        ids = session.take_pending()
        if ids:
            await self._free_ids(session, ids, timeout)
        return session

    async def _free_ids(self, session: SessionState, ids: list[str], timeout: Timeout) -> None:
        try:
            await self._invoke("Free", self._prepare_free(ids), timeout, None, self._via(session))
        except NotFoundError:
            pass  # one was gone already (the others are freed all the same), or all were
        except BaseException:
            session.pending.extend(ids)  # freed on the next call instead
            raise

    async def _session_exists(self, session: SessionState) -> bool:
        """See ``Client._session_exists``."""
        request = self._prepare_describe_session()
        via = self._via(session)
        try:
            await self._invoke("DescribeSession", request, SESSION_CALL_TIMEOUT, None, via)
        except NotFoundError:
            return False
        except TensorwireError:
            pass
        return True

    async def _end_session(self) -> None:
        """See ``Client._end_session``."""
        session, self._session = self._session, None
        if session is None or session.ended is not None:
            return
        session.ended = "was closed"
        request = self._prepare_close_session()
        with contextlib.suppress(TensorwireError, grpc.RpcError):
            via = self._via(session)
            await self._invoke("CloseSession", request, SESSION_CALL_TIMEOUT, None, via)
