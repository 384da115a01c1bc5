"""AsyncClient: the asyncio twin of Client, on grpc.aio, with the same methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from tensorwire._base import (
    DEFAULT_STREAM_THRESHOLD,
    STREAMED,
    USE_CLIENT_DEFAULT,
    BaseClient,
    Inputs,
    Timeout,
    _Reporter,
)
from tensorwire.codec import Encoder, Received
from tensorwire.streaming import DEFAULT_CHUNK_SIZE
from tensorwire.types import GradResult, ProgressCallback, ServerInfo


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
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(
            target, timeout=timeout, stream_threshold=stream_threshold, chunk_size=chunk_size
        )
        self._channel = self._open_channel(grpc.aio, target, credentials, options)
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

    async def _invoke(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None = None,
    ) -> Received[Any]:
        self._check_open()
        reporter = _Reporter(progress)
        deadline = self._deadline(self._timeout(timeout))
        if method in STREAMED and self._wants_stream(encoder):
            return await self._stream(method, encoder, deadline, reporter)
        try:
            result = await self._methods[method](
                encoder.finish(), timeout=self._remaining(deadline)
            )
        except grpc.RpcError as exc:
            error = self._fetch_again(method, exc)
            if error is not None:
                raise error from exc
            # The response is too large for one message: ask again as a stream.
            return await self._stream(method, encoder, deadline, reporter)
        received = self._unwrap(result)
        reporter.whole(encoder, received)
        return received

    async def _stream(
        self, method: str, encoder: Encoder[Any], deadline: float | None, reporter: _Reporter
    ) -> Received[Any]:
        parts, receiver = self._stream_call(method, encoder, reporter)
        call = self._methods[f"{method}Stream"](parts, timeout=self._remaining(deadline))
        try:
            async for raw in call:
                receiver.feed(raw)
            return receiver.finish()
        except BaseException as exc:
            call.cancel()  # whatever went wrong, stop the server's work too
            failure = self._stream_failure(exc, reporter)
            if failure is exc:
                raise
            # A status keeps the RpcError as its cause; the callback's own error stands alone.
            raise failure from (None if failure is reporter.error else exc)

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
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """See ``Client.infer``."""
        request = self._prepare_infer(model, inputs, outputs)
        return self._finish_infer(await self._invoke("Infer", request, timeout, progress))

    async def grad(
        self,
        model: str,
        inputs: Inputs,
        *,
        wrt: str | Sequence[str] | None = None,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        param_grads: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> GradResult:
        """See ``Client.grad``."""
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads)
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
