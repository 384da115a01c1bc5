"""AsyncClient: the asyncio twin of Client, on grpc.aio, with the same methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from tensorwire._base import (
    USE_CLIENT_DEFAULT,
    BaseClient,
    Inputs,
    Timeout,
)
from tensorwire.codec import Received
from tensorwire.types import GradResult, ServerInfo


class AsyncClient(BaseClient):
    """A connection to a tensorwire server for asyncio code; ``async with`` it.

    Every method is the coroutine twin of ``Client``'s, with the same arguments,
    results and errors.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, timeout=timeout)
        opts = self._options(options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._methods = self._bind_methods(self._channel)

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

    async def _invoke(self, method: str, request: bytes, timeout: Timeout) -> Received[Any]:
        self._check_open()
        try:
            result = await self._methods[method](request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return self._unwrap(result)

    async def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """See ``Client.info``."""
        return self._finish_info(await self._invoke("Info", self._prepare_info(), timeout))

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> dict[str, np.ndarray]:
        """See ``Client.infer``."""
        request = self._prepare_infer(model, inputs, outputs)
        return self._finish_infer(await self._invoke("Infer", request, timeout))

    async def grad(
        self,
        model: str,
        inputs: Inputs,
        *,
        wrt: str | Sequence[str] | None = None,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        param_grads: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> GradResult:
        """See ``Client.grad``."""
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads)
        return self._finish_grad(await self._invoke("Grad", request, timeout))

    async def call(
        self, function: str, *args: Any, timeout: Timeout = USE_CLIENT_DEFAULT, **kwargs: Any
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """See ``Client.call``."""
        request = self._prepare_call(function, args, kwargs)
        return self._finish_call(await self._invoke("Call", request, timeout))

    async def call_grad(
        self,
        function: str,
        *args: Any,
        wrt: int | Sequence[int] = 0,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        **kwargs: Any,
    ) -> GradResult:
        """See ``Client.call_grad``."""
        request = self._prepare_call_grad(function, args, kwargs, wrt, grad_outputs)
        return self._finish_grad(await self._invoke("Grad", request, timeout))
