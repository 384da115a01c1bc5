"""AsyncClient: the asyncio twin of Client, on grpc.aio, with the same methods."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar

import grpc
import grpc.aio
import numpy as np

from tensorwire._base import (
    USE_CLIENT_DEFAULT,
    BaseClient,
    Inputs,
    Timeout,
    _Call,
    _Retry,
)
from tensorwire.codec import Encoder, Received
from tensorwire.types import (
    GradResult,
    ModelInfo,
    ProgressCallback,
    ServerInfo,
    VersionStatistics,
)


class AsyncClient(BaseClient):
    """A connection to a tensorwire server for asyncio code; ``async with`` it.

    Every method is the coroutine twin of ``Client``'s, with the same constructor
    arguments, results, errors and retries.
    """

    _GRPC: ClassVar[Any] = grpc.aio

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
        """Close the channel; calls made afterwards raise RuntimeError."""
        if not self._closed:
            self._closed = True
            await self._channel.close(grace=None)

    async def _invoke(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None = None,
    ) -> Received[Any]:
        call = self._begin(method, encoder, timeout, progress)
        while True:
            try:
                return await self._attempt(call)
            except _Retry as retry:
                await asyncio.sleep(retry.delay)

    async def _attempt(self, call: _Call) -> Received[Any]:
        self._next_attempt(call)
        if not call.streamed:
            try:
                result = await self._methods[call.method](
                    call.encoder.finish(), timeout=call.remaining(), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                self._unary_failed(call, exc)  # returns only to ask again as a stream
            else:
                return self._unary_done(call, result)
        return await self._stream(call)

    async def _stream(self, call: _Call) -> Received[Any]:
        parts, receiver = self._stream_parts(call)
        rpc = self._methods[f"{call.method}Stream"](
            parts, timeout=call.remaining(), metadata=self._metadata
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

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        version: int = 0,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """See ``Client.infer``."""
        request = self._prepare_infer(model, inputs, outputs, version)
        return self._finish_infer(await self._invoke("Infer", request, timeout, progress))

    async def grad(
        self,
        model: str,
        inputs: Inputs,
        *,
        wrt: str | Sequence[str] | None = None,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        param_grads: bool = False,
        version: int = 0,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> GradResult:
        """See ``Client.grad``."""
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads, version)
        return self._finish_grad(await self._invoke("Grad", request, timeout, progress))

    async def call(
        self,
        function: str,
        *args: Any,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """See ``Client.call``."""
        request = self._prepare_call(function, args, kwargs)
        return self._finish_call(await self._invoke("Call", request, timeout, progress))

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
        request = self._prepare_call_grad(function, args, kwargs, wrt, grad_outputs)
        return self._finish_grad(await self._invoke("Grad", request, timeout, progress))

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
