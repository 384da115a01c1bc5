"""Client: the blocking tensorwire client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
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


class Client(BaseClient):
    """A connection to a tensorwire server; use it as a context manager.

    ``timeout`` is the default deadline in seconds of every call (None: no deadline);
    each method takes its own ``timeout`` too. Errors are ``tensorwire.TensorwireError``
    subclasses with the server's message and the ``grpc.RpcError`` as their cause.

    Requests with ``stream_threshold`` payload bytes or more, and responses too large
    for one message, travel as streams of ``chunk_size``-byte chunks, so tensors of
    any size that fits in memory go both ways. Methods that move tensors take a
    ``progress`` callback, called with a ``tensorwire.Progress`` as bytes move.
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
        self._channel = self._open_channel(grpc, target, credentials, options)
        self._methods = self._bind_methods(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls made afterwards raise RuntimeError."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def _invoke(
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
            return self._stream(method, encoder, deadline, reporter)
        try:
            result = self._methods[method](encoder.finish(), timeout=self._remaining(deadline))
        except grpc.RpcError as exc:
            error = self._fetch_again(method, exc)
            if error is not None:
                raise error from exc
            # The response is too large for one message: ask again as a stream.
            return self._stream(method, encoder, deadline, reporter)
        received = self._unwrap(result)
        reporter.whole(encoder, received)
        return received

    def _stream(
        self, method: str, encoder: Encoder[Any], deadline: float | None, reporter: _Reporter
    ) -> Received[Any]:
        parts, receiver = self._stream_call(method, encoder, reporter)
        call = self._methods[f"{method}Stream"](parts, timeout=self._remaining(deadline))
        try:
            for raw in call:
                receiver.feed(raw)
            return receiver.finish()
        except BaseException as exc:
            call.cancel()  # whatever went wrong, stop the server's work too
            failure = self._stream_failure(exc, reporter)
            if failure is exc:
                raise
            # A status keeps the RpcError as its cause; the callback's own error stands alone.
            raise failure from (None if failure is reporter.error else exc)

    def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """The server's versions, device, models with signatures, and Call functions."""
        return self._finish_info(self._invoke("Info", self._prepare_info(), timeout))

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (an array, a sequence bound by position, or a dict
        by name); return its outputs (or the ``outputs`` named) by name."""
        request = self._prepare_infer(model, inputs, outputs)
        return self._finish_infer(self._invoke("Infer", request, timeout, progress))

    def grad(
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
        """Outputs of ``model`` and gradients w.r.t. the inputs named in ``wrt`` (default:
        every floating point input). A non-scalar output needs ``grad_outputs`` (one
        array, or a dict by output name): the vector of a vector-Jacobian product.
        ``param_grads`` adds the gradients of the model's parameters."""
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads)
        return self._finish_grad(self._invoke("Grad", request, timeout, progress))

    def call(
        self,
        function: str,
        *args: Any,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run an allowlisted torch function (``"matmul"``, ``"linalg.svd"``, ...) on
        arrays and plain values; one array back, or a tuple for several results."""
        request = self._prepare_call(function, args, kwargs)
        return self._finish_call(self._invoke("Call", request, timeout, progress))

    def call_grad(
        self,
        function: str,
        *args: Any,
        wrt: int | Sequence[int] = 0,
        grad_outputs: np.ndarray | Mapping[str, Any] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> GradResult:
        """Like ``call`` with gradients w.r.t. the positional arguments in ``wrt``;
        ``grads`` is keyed by position as a string ("0", "1")."""
        request = self._prepare_call_grad(function, args, kwargs, wrt, grad_outputs)
        return self._finish_grad(self._invoke("Grad", request, timeout, progress))
