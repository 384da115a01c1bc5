"""What Client and AsyncClient share above the transport: every method written once,
as a flow (``tensorwire._flow``) that each twin drives with its own loop.

A method's flow builds its request (``_messages``), sends it, statelessly or in the
client's session (``_session``), and shapes the response: arrays of the caller's own,
or with ``keep=True`` the twin's remote tensors. The sending is the transport's
(``tensorwire._transport``): an object the client holds, not a base class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc
import numpy as np

from tensorwire import _described as described
from tensorwire import _messages as messages
from tensorwire._flow import Flow, Route, Send
from tensorwire._session import Held, SessionKeeper, SessionState
from tensorwire._transport.channel import Pem
from tensorwire._transport.status import DEFAULT_RETRIES
from tensorwire._transport.transport import DEFAULT_STREAM_THRESHOLD, Transport
from tensorwire.programs import Program
from tensorwire.types import (
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
from tensorwire.wire.streaming import DEFAULT_CHUNK_SIZE

#: The twin's remote tensor and trainer classes.
RT = TypeVar("RT")
TR = TypeVar("TR")


class BaseClient(Generic[RT, TR]):
    """The flows of every method, over the twin's remote tensors (RT) and trainers (TR),
    and the transport (``_TRANSPORT``) that sends their calls."""

    #: The kind of transport the twin holds (BlockingTransport, AsyncTransport): a
    #: subclass may name its own.
    _TRANSPORT: ClassVar[type[Transport]]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        retries: int = DEFAULT_RETRIES,
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        server_name: str | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        data_plane: bool = True,
        same_host: bool = True,
        fast_lane: bool | None = None,
    ) -> None:
        transport = self._TRANSPORT(
            target,
            name=type(self).__name__,
            timeout=timeout,
            retries=retries,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name=server_name,
            token=token,
            credentials=credentials,
            options=options,
            stream_threshold=stream_threshold,
            chunk_size=chunk_size,
            data_plane=data_plane,
            same_host=same_host,
            fast_lane=fast_lane,
        )
        self._use(transport)

    def _use(self, transport: Transport) -> None:
        """Send every call through ``transport``; no session yet: the first call that
        needs one opens it."""
        self._transport = transport
        self._session = SessionKeeper(transport.target, transport.metadata, self._session_route)
        self._session_lock = self._new_lock()

    def __repr__(self) -> str:
        # Never the token: reprs end up in logs and tracebacks.
        transport = self._transport
        token = ", token=<hidden>" if transport.metadata else ""
        closed = ", closed" if transport.closed else ""
        return f"{type(self).__name__}({self.target!r}, secure={transport.secure}{token}{closed})"

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._transport.closed

    @property
    def target(self) -> str:
        """The target, as given."""
        return self._transport.target

    @property
    def timeout(self) -> float | None:
        """The default deadline of every call, in seconds (None: none)."""
        return self._transport.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._transport.timeout = value

    @property
    def retries(self) -> int:
        """Attempts made after the first when one finds no server."""
        return self._transport.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._transport.retries = value

    @property
    def stream_threshold(self) -> int:
        """The payload bytes from which a request travels as a stream."""
        return self._transport.stream_threshold

    @stream_threshold.setter
    def stream_threshold(self, value: int) -> None:
        self._transport.stream_threshold = value

    @property
    def chunk_size(self) -> int:
        """The bytes of each chunk of a stream."""
        return self._transport.chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        self._transport.chunk_size = value

    def pin(self) -> Self:
        """A new client with this one's settings whose calls all go to one replica:
        the one this client sends its stateful calls to (chosen once, at random, among
        the addresses its target resolves to; a target of one server: that server).
        Handles and sessions live on one replica: make them through a pinned client,
        or with the methods that create them, which pin by themselves. Close it on
        its own; it keeps the target's name for TLS."""
        clone = copy.copy(self)
        clone._use(self._transport.pinned())
        return clone

    @staticmethod
    def _new_lock() -> Any:
        """The lock that serializes opening the session (threading's or asyncio's)."""
        raise NotImplementedError

    def _remote_tensor(self, session: SessionState, handle: Handle) -> RT:
        """The twin's remote tensor for ``handle`` in ``session``."""
        raise NotImplementedError

    def _trainer(self, session: SessionState, id: str, **description: Any) -> TR:
        """The twin's trainer ``id`` in ``session``, with its description."""
        raise NotImplementedError

    def _session_route(self, metadata: Any, idempotent: bool | None, stream: bool) -> Route:
        """The route of a call in a session: the pinned replica, the session's metadata."""
        return Route(self._transport.pinned_methods(), metadata, idempotent, stream)

    def _uses_session(self, *values: Any) -> bool:
        """Whether ``values`` hold remote tensors (also inside sequences and mappings),
        having checked that each is this client's and usable."""
        found = False
        for value in messages.remote_values(values):
            if isinstance(value, Held):
                value.lease.usable(self)
            found = True
        return found

    def _remote(self, session: SessionState) -> messages.Remote[RT]:
        """Makes this twin's remote tensors in ``session`` from handles."""
        return lambda handle: self._remote_tensor(session, handle)

    # ------------------------------------------------------------------ flows

    def _info_flow(self, timeout: Timeout) -> Flow[ServerInfo]:
        received = yield Send("Info", messages.info_request(), timeout)
        return described.server_info(received)

    def _infer_flow(
        self,
        model: str,
        inputs: Inputs,
        outputs: Sequence[str] | None,
        version: int,
        keep: bool,
        timeout: Timeout,
        progress: ProgressCallback | None,
    ) -> Flow[dict[str, np.ndarray] | dict[str, RT]]:
        stateful = self._uses_session(inputs) or keep
        request = messages.infer_request(model, inputs, outputs, version, keep)
        if not stateful:
            received = yield Send("Infer", request, timeout, progress)
            return messages.owned(received, received.message.outputs)
        session, received = yield from self._session.call(
            "Infer", request, timeout, progress, keep=keep
        )
        return messages.results(received, received.message.outputs, keep, self._remote(session))

    def _grad_flow(
        self,
        model: str,
        inputs: Inputs,
        wrt: str | Sequence[str] | None,
        grad_outputs: np.ndarray | Mapping[str, Any] | None,
        param_grads: bool,
        version: int,
        keep: bool,
        timeout: Timeout,
        progress: ProgressCallback | None,
    ) -> Flow[GradResult | RemoteGradResult[RT]]:
        stateful = self._uses_session(inputs, grad_outputs) or keep
        request = messages.grad_request(
            model, inputs, wrt, grad_outputs, param_grads, version, keep
        )
        return (yield from self._grad(request, stateful, keep, timeout, progress))

    def _call_grad_flow(
        self,
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        wrt: int | Sequence[int],
        grad_outputs: np.ndarray | Mapping[str, Any] | None,
        timeout: Timeout,
        progress: ProgressCallback | None,
    ) -> Flow[GradResult]:
        stateful = self._uses_session(args, kwargs, grad_outputs)
        request = messages.call_grad_request(function, args, kwargs, wrt, grad_outputs)
        result = yield from self._grad(request, stateful, False, timeout, progress)
        assert isinstance(result, GradResult)
        return result

    def _grad(
        self,
        request: Any,
        stateful: bool,
        keep: bool,
        timeout: Timeout,
        progress: ProgressCallback | None,
    ) -> Flow[GradResult | RemoteGradResult[RT]]:
        if not stateful:
            received = yield Send("Grad", request, timeout, progress)
            return messages.grad_result(received, False, None)
        session, received = yield from self._session.call(
            "Grad", request, timeout, progress, keep=keep
        )
        return messages.grad_result(received, keep, self._remote(session))

    def _call_flow(
        self,
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        keep: bool,
        timeout: Timeout,
        progress: ProgressCallback | None,
    ) -> Flow[np.ndarray | tuple[np.ndarray, ...] | RT | tuple[RT, ...]]:
        stateful = self._uses_session(args, kwargs) or keep
        request = messages.call_request(function, args, kwargs, keep)
        if not stateful:
            received = yield Send("Call", request, timeout, progress)
            arrays: np.ndarray | tuple[np.ndarray, ...] = messages.one_or_all(
                messages.owned(received, received.message.outputs).values()
            )
            return arrays
        session, received = yield from self._session.call(
            "Call", request, timeout, progress, keep=keep
        )
        outputs = received.message.outputs
        if not keep:
            arrays = messages.one_or_all(messages.owned(received, outputs).values())
            return arrays
        remotes: RT | tuple[RT, ...] = messages.one_or_all(
            messages.kept(received, outputs, self._remote(session)).values()
        )
        return remotes

    def _model_statistics_flow(
        self, model: str, version: int, timeout: Timeout
    ) -> Flow[list[VersionStatistics]]:
        request = messages.model_statistics_request(model, version)
        received = yield Send("ModelStatistics", request, timeout)
        return [described.statistics_from_wire(s) for s in received.message.statistics]

    def _load_model_flow(self, model: str, timeout: Timeout) -> Flow[ModelInfo]:
        received = yield Send("Load", messages.load_request(model), timeout)
        return described.model_info_from_wire(received.message.model)

    def _unload_model_flow(self, model: str, version: int, timeout: Timeout) -> Flow[None]:
        yield Send("Unload", messages.unload_request(model, version), timeout)

    # ------------------------------------------------------------------ remote tensors

    def _put_flow(
        self, value: Any, timeout: Timeout, progress: ProgressCallback | None
    ) -> Flow[RT]:
        self._uses_session(value)
        session, received = yield from self._session.call(
            "Put", messages.put_request(value), timeout, progress
        )
        return self._remote_tensor(session, messages.put_handle(received))

    def _get_flow(self, tensor: Any, timeout: Timeout) -> Flow[np.ndarray]:
        tensor.lease.usable(self)
        stream = tensor.nbytes >= self.stream_threshold  # streamed both ways: no 2 GiB cap
        request = messages.get_request(tensor.handle)
        _, received = yield from self._session.call("Get", request, timeout, stream=stream)
        return messages.get_array(received)

    def _free_flow(self, items: Sequence[Any], timeout: Timeout) -> Flow[None]:
        yield from self._session.release(self, items, timeout)

    def _session_info_flow(self, timeout: Timeout) -> Flow[SessionInfo]:
        request = messages.describe_session_request()
        _, received = yield from self._session.call("DescribeSession", request, timeout)
        return described.session_info(received)

    # ------------------------------------------------------------------ programs

    def _run_flow(
        self,
        program: Program,
        inputs: Mapping[str, Any],
        outputs: Sequence[Ref | str] | None,
        loss: Ref | str | None,
        wrt: Ref | str | Sequence[Ref | str] | None,
        keep: bool,
        timeout: Timeout,
        kept: Sequence[Ref | str] | None = None,
    ) -> Flow[ProgramResult[np.ndarray] | ProgramResult[RT]]:
        self._uses_session(inputs, [(s.args, s.kwargs) for s in program.calls])
        request = messages.run_request(program, inputs, outputs, loss, wrt, keep, kept or ())
        makes_handles = keep or bool(kept)  # then never sent twice
        session, received = yield from self._session.call(
            "Run", request, timeout, keep=makes_handles, carry=request.message.free.extend
        )
        return messages.program_result(received, keep, self._remote(session))

    # ------------------------------------------------------------------ training

    def _trainer_flow(
        self,
        model: str,
        version: int,
        optimizer: str,
        options: Mapping[str, Any],
        loss: str,
        loss_options: Mapping[str, Any] | None,
        timeout: Timeout,
    ) -> Flow[TR]:
        request = messages.trainer_request(model, version, optimizer, options, loss, loss_options)
        session, received = yield from self._session.call("CreateTrainer", request, timeout)
        m = received.message
        return self._trainer(
            session,
            m.trainer,
            model=model,
            optimizer=optimizer,
            loss=loss,
            parameters=tuple(described.tensor_spec_from_wire(p) for p in m.parameters),
            nbytes=m.bytes,
        )

    def _step_flow(
        self, trainer: Any, inputs: Inputs, target: Any, output: str | None, timeout: Timeout
    ) -> Flow[float]:
        trainer.lease.usable(self)
        self._uses_session(inputs, target)
        request = messages.step_request(trainer.id, inputs, target, output)
        _, received = yield from self._session.call("Step", request, timeout)
        trainer.steps = int(received.message.step)
        return float(received.message.loss)

    def _parameters_flow(self, trainer: Any, timeout: Timeout) -> Flow[dict[str, np.ndarray]]:
        trainer.lease.usable(self)
        request = messages.parameters_request(trainer.id)
        _, received = yield from self._session.call("Parameters", request, timeout)
        return messages.owned(received, received.message.parameters)
