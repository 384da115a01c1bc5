"""Client: the blocking tensorwire client."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar

import grpc
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


class Client(BaseClient):
    """A connection to a tensorwire server; use it as a context manager.

    ``timeout`` is the default deadline in seconds of every call (None: no deadline);
    each method takes its own ``timeout`` too. Errors are ``tensorwire.TensorwireError``
    subclasses with the server's message and the ``grpc.RpcError`` as their cause.

    A call that finds no server (UNAVAILABLE) is made again up to ``retries`` times,
    after a jittered exponential backoff, within its deadline; no other error is
    retried, nor a call once part of its response has arrived, nor ``load_model`` and
    ``unload_model``, which change what the server serves. When retries run out,
    UnavailableError names the target.

    TLS: ``root_certificates`` (the CAs to trust; default: the system's), and for a
    client certificate ``certificate_chain`` and ``private_key``: each PEM bytes or a
    path. ``tls`` None uses TLS when any is given, True with the system's CAs, False
    never. ``server_name`` is the name the server's certificate must carry when it is
    not the target's host. ``token`` travels on every call as ``authorization: Bearer``;
    plain text carries it only to this machine (ValueError otherwise). ``credentials``
    replaces all of the TLS arguments with gRPC channel credentials of your own.

    Requests with ``stream_threshold`` payload bytes or more, and responses too large
    for one message, travel as streams of ``chunk_size``-byte chunks, so tensors of
    any size that fits in memory go both ways. Methods that move tensors take a
    ``progress`` callback, called with a ``tensorwire.Progress`` as bytes move; a
    retried upload reports its stage again from 0.
    """

    _GRPC: ClassVar[Any] = grpc

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
        call = self._begin(method, encoder, timeout, progress)
        while True:
            try:
                return self._attempt(call)
            except _Retry as retry:
                time.sleep(retry.delay)

    def _attempt(self, call: _Call) -> Received[Any]:
        self._next_attempt(call)
        if not call.streamed:
            try:
                result = self._methods[call.method](
                    call.encoder.finish(), timeout=call.remaining(), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                self._unary_failed(call, exc)  # returns only to ask again as a stream
            else:
                return self._unary_done(call, result)
        return self._stream(call)

    def _stream(self, call: _Call) -> Received[Any]:
        parts, receiver = self._stream_parts(call)
        rpc = self._methods[f"{call.method}Stream"](
            parts, timeout=call.remaining(), metadata=self._metadata
        )
        try:
            for raw in rpc:
                call.responded = True
                receiver.feed(raw)
            return receiver.finish()
        except BaseException as exc:
            rpc.cancel()  # whatever went wrong, stop the server's work too
            self._stream_failed(call, exc)

    def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """The server's versions, device, models with signatures, and Call functions."""
        return self._finish_info(self._invoke("Info", self._prepare_info(), timeout))

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        version: int = 0,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (an array, a sequence bound by position, or a dict
        by name); return its outputs (or the ``outputs`` named) by name. ``version``
        pins a version of the model (0: the newest serving); one not loaded is
        NotFoundError."""
        request = self._prepare_infer(model, inputs, outputs, version)
        return self._finish_infer(self._invoke("Infer", request, timeout, progress))

    def grad(
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
        """Outputs of ``model`` and gradients w.r.t. the inputs named in ``wrt`` (default:
        every floating point input). A non-scalar output needs ``grad_outputs`` (one
        array, or a dict by output name): the vector of a vector-Jacobian product.
        ``param_grads`` adds the gradients of the model's parameters; ``version`` pins
        a version of the model, as for ``infer``."""
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads, version)
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

    def model_statistics(
        self, model: str = "", version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> list[VersionStatistics]:
        """What each version of ``model`` (default: every model) has done since it was
        loaded: requests, failures, forward passes, batch sizes, time queued and
        computing; one entry per version (``version`` 0: every version), sorted by
        model, newest version first. NotFoundError for an unknown model or version."""
        request = self._prepare_model_statistics(model, version)
        return self._finish_model_statistics(self._invoke("ModelStatistics", request, timeout))

    def load_model(self, model: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """Have the server (re)load ``model`` from its model repository: every version
        its folder holds now, which replace the versions serving once loaded; return
        the model as it now serves. FailedPreconditionError unless the server runs with
        model control "explicit"; NotFoundError when the repository has no such model;
        InvalidArgumentError when it fails to load (what served goes on serving).
        Never retried by the client, even when no server was reached."""
        request = self._prepare_load_model(model)
        return self._finish_load_model(self._invoke("Load", request, timeout))

    def unload_model(
        self, model: str, version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Stop serving ``model``, or only its ``version`` (0: every version); returns
        once requests in flight have finished and its memory is released.
        FailedPreconditionError unless the server runs with model control "explicit";
        NotFoundError for a model or version not loaded. Never retried by the client."""
        request = self._prepare_unload_model(model, version)
        self._finish_unload_model(self._invoke("Unload", request, timeout))
