"""Client: the blocking tensorwire client."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, overload

import grpc
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
    Program,
    ProgramResult,
    RemoteGradResult,
    RemoteTensor,
    Trainer,
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


class Client(BaseClient):
    """A connection to a tensorwire server; use it as a context manager.

    ``target`` is "host:port", a gRPC target ("dns:///name:port", "unix:path"), or
    several replicas: a sequence, or one comma-separated string, of "host:port". Calls
    go to every address the target resolves to in turn (gRPC's round_robin); calls that
    make or use state a server holds go to one replica only, as do all calls of a
    client from ``pin()``.

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

    Tensors can stay on the server between calls (``put``, and ``keep=True`` on
    ``infer``, ``grad``, ``call`` and ``run``) as ``RemoteTensor``s, in a session the
    client opens on the first call that needs one and closes with ``close``; so do
    ``trainer``s. Those calls go to one replica of a multi-address target, and are
    not retried when they create or free something.
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
        """Close the session (freeing its tensors and trainers on the server) and the
        channel; calls made afterwards raise RuntimeError."""
        if not self._closed:
            self._end_session()
            self._closed = True
            for channel in self._channels():
                channel.close()

    def _invoke(
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
                return self._attempt(call)
            except _Retry as retry:
                time.sleep(retry.delay)

    def _attempt(self, call: _Call) -> Received[Any]:
        self._next_attempt(call)
        if not call.streamed:
            try:
                result = call.methods[call.method](
                    call.encoder.finish(), timeout=call.remaining(), metadata=call.metadata
                )
            except grpc.RpcError as exc:
                self._unary_failed(call, exc)  # returns only to ask again as a stream
            else:
                return self._unary_done(call, result)
        return self._stream(call)

    def _stream(self, call: _Call) -> Received[Any]:
        parts, receiver = self._stream_parts(call)
        rpc = call.methods[f"{call.method}Stream"](
            parts, timeout=call.remaining(), metadata=call.metadata
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

    @overload
    def infer(
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
    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = ...,
        version: int = ...,
        keep: Literal[True],
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
    ) -> dict[str, RemoteTensor]: ...
    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Sequence[str] | None = None,
        version: int = 0,
        keep: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray] | dict[str, RemoteTensor]:
        """Run ``model`` on ``inputs`` (an array, a sequence bound by position, or a dict
        by name; arrays or remote tensors); return its outputs (or the ``outputs``
        named) by name. ``version`` pins a version of the model (0: the newest
        serving); one not loaded is NotFoundError. ``keep``: the outputs stay on the
        server, returned as RemoteTensors."""
        stateful = self._uses_session(inputs) or keep
        request = self._prepare_infer(model, inputs, outputs, version, keep)
        if not stateful:
            return self._finish_infer(self._invoke("Infer", request, timeout, progress))
        session, received = self._stateful("Infer", request, timeout, progress, keep=keep)
        if keep:
            return self._remotes(session, _kept(received, received.message.outputs))
        return self._finish_infer(received)

    @overload
    def grad(
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
    def grad(
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
    ) -> RemoteGradResult[RemoteTensor]: ...
    def grad(
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
    ) -> GradResult | RemoteGradResult[RemoteTensor]:
        """Outputs of ``model`` and gradients w.r.t. the inputs named in ``wrt`` (default:
        every floating point input). A non-scalar output needs ``grad_outputs`` (one
        array, or a dict by output name): the vector of a vector-Jacobian product.
        ``param_grads`` adds the gradients of the model's parameters; ``version`` pins
        a version of the model, and ``keep`` keeps the results on the server, as for
        ``infer``."""
        stateful = self._uses_session(inputs, grad_outputs) or keep
        request = self._prepare_grad(model, inputs, wrt, grad_outputs, param_grads, version, keep)
        if not stateful:
            return self._finish_grad(self._invoke("Grad", request, timeout, progress))
        session, received = self._stateful("Grad", request, timeout, progress, keep=keep)
        if not keep:
            return self._finish_grad(received)
        m = received.message
        return RemoteGradResult(
            outputs=self._remotes(session, _kept(received, m.outputs)),
            grads=self._remotes(session, _kept(received, m.grads)),
            param_grads=self._remotes(session, _kept(received, m.param_grads)),
        )

    @overload
    def call(
        self,
        function: str,
        *args: Any,
        keep: Literal[False] = ...,
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, ...]: ...
    @overload
    def call(
        self,
        function: str,
        *args: Any,
        keep: Literal[True],
        timeout: Timeout = ...,
        progress: ProgressCallback | None = ...,
        **kwargs: Any,
    ) -> RemoteTensor | tuple[RemoteTensor, ...]: ...
    def call(
        self,
        function: str,
        *args: Any,
        keep: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, ...] | RemoteTensor | tuple[RemoteTensor, ...]:
        """Run an allowlisted torch function (``"matmul"``, ``"linalg.svd"``, ...) on
        arrays, remote tensors and plain values; one array back, or a tuple for several
        results. ``keep``: the results stay on the server, as RemoteTensors."""
        stateful = self._uses_session(args, kwargs) or keep
        request = self._prepare_call(function, args, kwargs, keep)
        if not stateful:
            return self._finish_call(self._invoke("Call", request, timeout, progress))
        session, received = self._stateful("Call", request, timeout, progress, keep=keep)
        if not keep:
            return self._finish_call(received)
        kept = tuple(self._remotes(session, _kept(received, received.message.outputs)).values())
        return kept[0] if len(kept) == 1 else kept

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
        stateful = self._uses_session(args, kwargs, grad_outputs)
        request = self._prepare_call_grad(function, args, kwargs, wrt, grad_outputs)
        if not stateful:
            return self._finish_grad(self._invoke("Grad", request, timeout, progress))
        return self._finish_grad(self._stateful("Grad", request, timeout, progress)[1])

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

    # ------------------------------------------------------------------ remote tensors

    def put(
        self,
        value: Any,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        progress: ProgressCallback | None = None,
    ) -> RemoteTensor:
        """Store an array on the server, in this client's session; a RemoteTensor
        given makes a copy of it there. Never retried: a second Put would hold the
        tensor twice."""
        self._uses_session(value)
        session, received = self._stateful("Put", self._prepare_put(value), timeout, progress)
        return RemoteTensor(self, session, self._finish_put(received))

    def free(self, *items: RemoteTensor | Trainer, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Release remote tensors and trainers on the server, in one call; freeing one
        twice, or one whose session has ended, is harmless."""
        session, ids = self._to_free(items)
        if session is not None:
            self._free_ids(session, [*session.take_pending(), *ids], timeout)

    def session_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SessionInfo:
        """What this client's session holds on the server (opening it if need be)."""
        request = self._prepare_describe_session()
        return self._finish_describe_session(self._stateful("DescribeSession", request, timeout)[1])

    def _get(self, tensor: RemoteTensor, timeout: Timeout) -> np.ndarray:
        """The data of ``tensor`` (``RemoteTensor.numpy``)."""
        tensor._usable(self)
        stream = tensor.nbytes >= self.stream_threshold  # streamed both ways: no 2 GiB cap
        request = self._prepare_get(tensor.handle)
        return self._finish_get(self._stateful("Get", request, timeout, stream=stream)[1])

    def _remotes(
        self, session: SessionState, handles: list[tuple[str, Handle]]
    ) -> dict[str, RemoteTensor]:
        return {name: RemoteTensor(self, session, handle) for name, handle in handles}

    # ------------------------------------------------------------------ programs

    @overload
    def run(
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
    def run(
        self,
        program: Program,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[Ref | str] | None = ...,
        loss: Ref | str | None = ...,
        wrt: Ref | str | Sequence[Ref | str] | None = ...,
        keep: Literal[True],
        timeout: Timeout = ...,
    ) -> ProgramResult[RemoteTensor]: ...
    def run(
        self,
        program: Program,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[Ref | str] | None = None,
        loss: Ref | str | None = None,
        wrt: Ref | str | Sequence[Ref | str] | None = None,
        keep: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ProgramResult[np.ndarray] | ProgramResult[RemoteTensor]:
        """Run ``program`` on the server in one round trip, its inputs given by name
        (arrays or remote tensors). Returns the refs in ``outputs`` (default: the last
        step's results) named by their refs, and with ``loss`` (a ref to a scalar) its
        gradient with respect to the inputs in ``wrt`` (default: every floating point
        input). ``keep``: the results stay on the server, as RemoteTensors."""
        self._uses_session(inputs, [(s.args, s.kwargs) for s in program._steps])
        request = self._prepare_run(program, inputs, outputs, loss, wrt, keep)
        session, received = self._stateful("Run", request, timeout, keep=keep)
        m = received.message
        if keep:
            return ProgramResult(
                self._remotes(session, _kept(received, m.outputs)),
                self._remotes(session, _kept(received, m.grads)),
            )
        return ProgramResult(_owned(received, m.outputs), _owned(received, m.grads))

    # ------------------------------------------------------------------ training

    def trainer(
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
    ) -> Trainer:
        """A trainable copy of ``model`` (its newest version, or ``version``) on the
        server, with an ``optimizer`` ("sgd", "adam", "adamw") and a ``loss`` ("mse",
        "l1", "cross_entropy", ...; ``loss_options`` such as ``reduction``). The
        hyperparameters given go to the optimizer by torch's names; the others keep
        torch's defaults."""
        values = (lr, momentum, dampening, weight_decay, nesterov, betas, eps, amsgrad)
        options = dict(zip(OPTIMIZER_OPTIONS, values, strict=True))
        request = self._prepare_trainer(model, version, optimizer, options, loss, loss_options)
        session, received = self._stateful("CreateTrainer", request, timeout)
        m = received.message
        return Trainer(
            self,
            session,
            m.trainer,
            model=model,
            optimizer=optimizer,
            loss=loss,
            parameters=tuple(_spec(p) for p in m.parameters),
            nbytes=m.bytes,
        )

    def _step(
        self, trainer: Trainer, inputs: Inputs, target: Any, output: str | None, timeout: Timeout
    ) -> float:
        """One training step (``Trainer.step``)."""
        trainer._usable(self)
        self._uses_session(inputs, target)
        request = self._prepare_step(trainer.id, inputs, target, output)
        m = self._stateful("Step", request, timeout)[1].message
        trainer.steps = int(m.step)
        return float(m.loss)

    def _parameters(self, trainer: Trainer, timeout: Timeout) -> dict[str, np.ndarray]:
        """A trainer's parameters (``Trainer.parameters``)."""
        trainer._usable(self)
        request = self._prepare_parameters(trainer.id)
        return self._finish_parameters(self._stateful("Parameters", request, timeout)[1])

    # ------------------------------------------------------------------ the session

    def _stateful(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None = None,
        *,
        keep: bool = False,
        stream: bool = False,
    ) -> tuple[SessionState, Received[Any]]:
        """Make a call in this client's session, opening it if need be; ``keep``: the
        call makes handles, so it is never sent twice."""
        session = self._open_session(timeout)
        via = self._via(session, idempotent=False if keep else None, stream=stream)
        try:
            return session, self._invoke(method, encoder, timeout, progress, via)
        except NotFoundError as exc:
            if self._session_exists(session):
                raise
            raise self._session_lost(session) from exc

    def _open_session(self, timeout: Timeout) -> SessionState:
        """The session, opened on first use; frees what garbage collection queued."""
        session = self._session
        if session is None:
            with self._session_lock:
                session = self._session
                if session is None:
                    request = self._prepare_open_session()
                    received = self._invoke("OpenSession", request, timeout, None, self._via(None))
                    session = self._session = self._finish_open_session(received)
        ids = session.take_pending()
        if ids:
            self._free_ids(session, ids, timeout)
        return session

    def _free_ids(self, session: SessionState, ids: list[str], timeout: Timeout) -> None:
        try:
            self._invoke("Free", self._prepare_free(ids), timeout, None, self._via(session))
        except NotFoundError:
            pass  # one was gone already (the others are freed all the same), or all were
        except BaseException:
            session.pending.extend(ids)  # freed on the next call instead
            raise

    def _session_exists(self, session: SessionState) -> bool:
        """Whether the server still has ``session``; True when it cannot tell."""
        request = self._prepare_describe_session()
        try:
            self._invoke("DescribeSession", request, SESSION_CALL_TIMEOUT, None, self._via(session))
        except NotFoundError:
            return False
        except TensorwireError:
            pass
        return True

    def _end_session(self) -> None:
        """Close the session, best effort: the server frees it by its TTL anyway."""
        session, self._session = self._session, None
        if session is None or session.ended is not None:
            return
        session.ended = "was closed"
        request = self._prepare_close_session()
        with contextlib.suppress(TensorwireError, grpc.RpcError):
            self._invoke("CloseSession", request, SESSION_CALL_TIMEOUT, None, self._via(session))
