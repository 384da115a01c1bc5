"""Client: the blocking tensorwire client."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar, overload

import numpy as np

from tensorwire._base import BaseClient
from tensorwire._flow import Flow, Locked
from tensorwire._messages import OPTIMIZER_OPTIONS
from tensorwire._session import SessionState
from tensorwire._transport.blocking import BlockingTransport
from tensorwire.programs import Program
from tensorwire.remote import RemoteTensor, Trainer
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


class Client(BaseClient[RemoteTensor, Trainer]):
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
    any size that fits in memory go both ways. A stream's payloads skip gRPC on the
    server's data port (a ticket over gRPC, the bytes on a pooled TCP connection to
    the same host, with the channel's TLS) and fall back to chunks through gRPC where
    it cannot be reached; ``data_plane=False`` keeps them in gRPC. A server on this
    host (Linux) takes them through shared memory instead: the client copies each
    payload into a segment of its own, the server reads it in place and writes the
    results into segments that become the returned arrays (``same_host=False``: the
    network path always). Smaller calls take the server's fast lane where they
    can: compact frames on a pooled data-port connection opened with a grant obtained
    over gRPC, with gRPC's statuses, deadlines and retries; ``fast_lane=False`` (or
    the environment's TENSORWIRE_FAST_LANE=0 when it is not given) keeps them on
    gRPC, as does a server without the lane. Methods that move
    tensors take a ``progress`` callback, called with a ``tensorwire.Progress`` as
    bytes move; a retried upload reports its stage again from 0.

    Tensors can stay on the server between calls (``put``, and ``keep=True`` on
    ``infer``, ``grad``, ``call`` and ``run``) as ``RemoteTensor``s, in a session the
    client opens on the first call that needs one and closes with ``close``; so do
    ``trainer``s. Those calls go to one replica of a multi-address target, and are
    not retried when they create or free something.
    """

    _TRANSPORT: ClassVar[type[BlockingTransport]] = BlockingTransport
    _transport: BlockingTransport

    def _remote_tensor(self, session: SessionState, handle: Handle) -> RemoteTensor:
        return RemoteTensor(self, session, handle)

    def _trainer(self, session: SessionState, id: str, **description: Any) -> Trainer:
        return Trainer(self, session, id, **description)

    @staticmethod
    def _new_lock() -> Any:
        return threading.Lock()

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
        if not self.closed:
            self._drive(self._session.end())
            self._transport.close()

    # ------------------------------------------------------------------ the loop

    def _drive(self, flow: Flow[T]) -> T:
        """Run ``flow``: make each call it yields and send back the answer, or throw
        in the error; its return value is the result."""
        try:
            step = flow.send(None)
            while True:
                try:
                    if isinstance(step, Locked):
                        with self._session_lock:
                            result: Any = self._drive(step.flow)
                    else:
                        result = self._transport.invoke(step)
                except BaseException as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ServerInfo:
        """The server's versions, device, models with signatures, and Call functions."""
        return self._drive(self._info_flow(timeout))

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
        flow = self._infer_flow(model, inputs, outputs, version, keep, timeout, progress)
        return self._drive(flow)

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
        return self._drive(
            self._grad_flow(
                model, inputs, wrt, grad_outputs, param_grads, version, keep, timeout, progress
            )
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
        return self._drive(self._call_flow(function, args, kwargs, keep, timeout, progress))

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
        flow = self._call_grad_flow(function, args, kwargs, wrt, grad_outputs, timeout, progress)
        return self._drive(flow)

    def model_statistics(
        self, model: str = "", version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> list[VersionStatistics]:
        """What each version of ``model`` (default: every model) has done since it was
        loaded: requests, failures, forward passes, batch sizes, time queued and
        computing; one entry per version (``version`` 0: every version), sorted by
        model, newest version first. NotFoundError for an unknown model or version."""
        return self._drive(self._model_statistics_flow(model, version, timeout))

    def load_model(self, model: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """Have the server (re)load ``model`` from its model repository: every version
        its folder holds now, which replace the versions serving once loaded; return
        the model as it now serves. FailedPreconditionError unless the server runs with
        model control "explicit"; NotFoundError when the repository has no such model;
        InvalidArgumentError when it fails to load (what served goes on serving).
        Never retried by the client, even when no server was reached."""
        return self._drive(self._load_model_flow(model, timeout))

    def unload_model(
        self, model: str, version: int = 0, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Stop serving ``model``, or only its ``version`` (0: every version); returns
        once requests in flight have finished and its memory is released.
        FailedPreconditionError unless the server runs with model control "explicit";
        NotFoundError for a model or version not loaded. Never retried by the client."""
        self._drive(self._unload_model_flow(model, version, timeout))

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
        return self._drive(self._put_flow(value, timeout, progress))

    def get(self, tensor: RemoteTensor, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> np.ndarray:
        """The data of a remote tensor, fetched from the server (``RemoteTensor.numpy``)."""
        return self._drive(self._get_flow(tensor, timeout))

    def free(self, *items: RemoteTensor | Trainer, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Release remote tensors and trainers on the server, in one call; freeing one
        twice, or one whose session has ended, is harmless."""
        self._drive(self._free_flow(items, timeout))

    def session_info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SessionInfo:
        """What this client's session holds on the server (opening it if need be)."""
        return self._drive(self._session_info_flow(timeout))

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
        kept: Sequence[Ref | str] | None = ...,
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
        kept: Sequence[Ref | str] | None = ...,
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
        kept: Sequence[Ref | str] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ProgramResult[np.ndarray] | ProgramResult[RemoteTensor]:
        """Run ``program`` on the server in one round trip, its inputs given by name
        (arrays or remote tensors). Returns the refs in ``outputs`` (default: the last
        step's results) named by their refs, and with ``loss`` (a ref to a scalar) its
        gradient with respect to the inputs in ``wrt`` (default: every floating point
        input). ``keep``: the results stay on the server, as RemoteTensors. ``kept``:
        refs (intermediates, or outputs too) that stay on the server as well, whatever
        ``keep`` says, in ``result.kept`` as RemoteTensors: one call both returns
        values and keeps what later programs read."""
        return self._drive(self._run_flow(program, inputs, outputs, loss, wrt, keep, timeout, kept))

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
        flow = self._trainer_flow(model, version, optimizer, options, loss, loss_options, timeout)
        return self._drive(flow)

    def step(
        self,
        trainer: Trainer,
        inputs: Inputs,
        target: Any,
        *,
        output: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> float:
        """One training step of ``trainer`` (``Trainer.step``)."""
        return self._drive(self._step_flow(trainer, inputs, target, output, timeout))

    def parameters(
        self, trainer: Trainer, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> dict[str, np.ndarray]:
        """The parameters of ``trainer`` now (``Trainer.parameters``)."""
        return self._drive(self._parameters_flow(trainer, timeout))
