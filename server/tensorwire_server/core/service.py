"""The transport-free service core: everything the tensorwire.v1 and KServe v2 services
do beyond translating messages.

It takes and returns domain values (arrays, handles, model entries, statistics) and
raises ``tensorwire.errors``; it never sees gRPC or protobuf. What only the transport
knows (who calls, in which session, until when) comes in as a ``Caller``. Both
servicers translate their wire messages to calls on one Service, so engine access,
sessions, limits, model control, statistics and metric labels exist once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

import tensorwire_server
from tensorwire.errors import (
    FailedPreconditionError,
    NotFoundError,
    TensorwireError,
    UnavailableError,
    shown,
)
from tensorwire.wire.codec import Handle
from tensorwire.wire.protocol import SESSION_KEY
from tensorwire_server.core.loading import ModelControl
from tensorwire_server.core.sessions import Session, Sessions
from tensorwire_server.core.training import LOSSES, OPTIMIZERS
from tensorwire_server.core.workspace import Workspace
from tensorwire_server.device.staging import Stager, stager_for
from tensorwire_server.engine import programs
from tensorwire_server.engine.engine import (
    DeviceSummary,
    Engine,
    Export,
    GradOutcome,
    Inference,
    as_array,
)
from tensorwire_server.engine.programs import ProgramOutcome, ProgramPlan
from tensorwire_server.limits import Limits
from tensorwire_server.models.batching import Runner
from tensorwire_server.models.registry import ModelEntry, ServedVersion
from tensorwire_server.models.repository import model_names
from tensorwire_server.models.statistics import StatsSnapshot
from tensorwire_server.named import Named
from tensorwire_server.regions.copies import Copies
from tensorwire_server.regions.cuda import CudaSharedMemory
from tensorwire_server.regions.system import SharedMemory
from tensorwire_server.regions.table import RegionTable, owner_of
from tensorwire_server.settings import Settings

#: Turns a tensor a request names by handle into the session's tensor.
Resolve = Callable[[Handle, str], Any]


@dataclass(frozen=True)
class Caller:
    """What the transport knows of a call: who makes it (the token's name; empty when
    the server checks no tokens), the session it names (empty: none) and when its
    caller stops waiting (``time.monotonic()``; None: never)."""

    identity: str = ""
    session: str = ""
    deadline: float | None = None


@dataclass(frozen=True)
class SessionsSummary:
    """The sessions the server holds and what a new one gets."""

    count: int
    bytes: int
    quota: int
    ttl: float
    max_sessions: int
    losses: list[str]
    optimizers: list[str]


@dataclass(frozen=True)
class ServerInfo:
    """What the server is and serves (Info)."""

    server_version: str
    torch_version: str
    device: DeviceSummary
    #: Every model (serving or failed), by name.
    models: list[ModelEntry]
    #: Every allowlisted function's name and description, by name.
    functions: list[tuple[str, str]]
    sessions: SessionsSummary


class Service:
    """The server's operations over one engine (given once its models are loaded), its
    sessions, its limits and its model control; the settings size each of them."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        control: ModelControl | None = None,
    ) -> None:
        self.limits = Limits.from_settings(settings)
        #: Every client's kept tensors and trainers.
        self.sessions = Sessions.from_settings(settings)
        #: This server's kernel copies to and from clients' shared memory (its warm
        #: buffers, its count of copies cut short): regions' and the data port's.
        self.copies = Copies()
        #: The shared-memory regions clients registered, both kinds in one namespace
        #: with one set of limits (off unless allowed).
        self.regions = RegionTable(
            settings.allow_shared_memory,
            settings.max_shared_memory_regions,
            settings.max_shared_memory_bytes,
            settings.shared_memory_bytes_per_token,
        )
        #: The system shared-memory regions.
        self.shared_memory = SharedMemory(self.regions, self.copies)
        #: The CUDA shared-memory regions (on a CUDA server).
        self.cuda_memory = CudaSharedMemory(self.regions)
        self._engine = engine
        if engine is not None:
            self.cuda_memory.device, self.cuda_memory.health = engine.device, engine.health
        #: Loads and unloads models while serving; None: this server cannot.
        self.control = control

    def ready(self, engine: Engine, control: ModelControl | None = None) -> None:
        """Serve with ``engine``, its models loaded, and ``control`` over them."""
        self._engine = engine
        self.cuda_memory.device, self.cuda_memory.health = engine.device, engine.health
        self.control = control

    @property
    def engine(self) -> Engine:
        """The engine; UNAVAILABLE until the server has one (its models still loading)."""
        if self._engine is None:
            raise UnavailableError("the server is starting: models are loading")
        return self._engine

    def label(self, name: str, functions: bool = True) -> str:
        """``name`` as a metric label: a model's (or, with ``functions``, a function's)
        name the server knows, else "unknown" (clients inventing names must not grow
        the metrics without bound); empty stays empty."""
        engine = self.engine
        known = name in engine.registry or (functions and name in engine.functions)
        return name if known or not name else "unknown"

    def is_model(self, name: str) -> bool:
        """Whether ``name`` is a model the server serves (False while none is loaded)."""
        engine = self._engine
        return engine is not None and name in engine.registry

    def batched(self, model: str) -> bool:
        """Whether requests to ``model`` (any version of it) may be batched together."""
        return self.engine.registry.batched(model)

    def stager(self) -> Stager:
        """Where a streamed request's payloads land, within the limits."""
        engine = self.engine
        return stager_for(engine.device, self.limits, engine.health)

    # ------------------------------------------------------------------ description

    def info(self) -> ServerInfo:
        """The server, its device, models, functions and sessions now."""
        engine = self.engine
        sessions = self.sessions
        return ServerInfo(
            server_version=tensorwire_server.__version__,
            torch_version=torch.__version__,
            device=engine.describe_device(),
            models=[entry for _, entry in sorted(engine.registry.entries().items())],
            functions=[(n, engine.functions[n].description) for n in sorted(engine.functions)],
            sessions=SessionsSummary(
                count=sessions.count(),
                bytes=sessions.bytes(),
                quota=sessions.quota,
                ttl=sessions.ttl,
                max_sessions=sessions.max_sessions,
                losses=sorted(LOSSES),
                optimizers=sorted(OPTIMIZERS),
            ),
        )

    def models(self) -> dict[str, ModelEntry]:
        """Every model the registry holds (serving or failed), by name."""
        return self.engine.registry.entries()

    def statistics(self, model: str = "", version: int = 0) -> list[StatsSnapshot]:
        """The counters of every serving version of ``model`` (empty: of every model),
        by model name; ``version`` picks one. NOT_FOUND for a model or version that
        does not serve."""
        entries = self.engine.registry.entries()
        if model:
            entry = entries.get(model)
            if entry is None:
                raise NotFoundError(f"model {shown(model)} not found")
            entries = {model: entry}
        snapshots = [
            served.stats.snapshot()
            for _, entry in sorted(entries.items())
            for number, served in entry.versions.items()
            if version in (0, number)
        ]
        if version and not snapshots:
            raise NotFoundError(f"model {shown(model)} has no version {version}")
        return snapshots

    def model_ready(self, name: str, version: int = 0) -> bool:
        """Whether ``name`` (``version``; 0: any version) serves."""
        entry = self.engine.registry.entries().get(name)
        serving = entry.versions if entry is not None else {}
        return version in serving if version else bool(serving)

    @contextmanager
    def serving(self, name: str, version: int = 0) -> Iterator[ServedVersion]:
        """The version of ``name`` that serves a request (0: the newest), held while it
        runs; NOT_FOUND when none serves."""
        with self.engine.registry.using(name, version) as served:
            yield served

    @contextmanager
    def described(self, name: str, version: int = 0) -> Iterator[tuple[ModelEntry, ServedVersion]]:
        """``serving``, with the model's entry (every version it serves)."""
        registry = self.engine.registry
        with registry.using(name, version) as served:
            entry = registry.entries().get(name) or ModelEntry(
                served.config, {served.version: served}
            )
            yield entry, served

    def repository_models(self) -> list[str]:
        """Every model in the model repository, loaded or not (none without a repository
        or model control); ConfigError when the repository cannot be listed."""
        control = self.control
        if control is None or control.root is None:
            return []
        return model_names(control.root)

    # ------------------------------------------------------------------ model control

    def load(self, name: str) -> ModelEntry:
        """Load (or reload) repository model ``name``."""
        return self._control.load(name)

    def unload(self, name: str, version: int = 0) -> list[int]:
        """Stop serving ``name`` (or one version of it)."""
        return self._control.unload(name, version)

    @contextmanager
    def _a_model(self, name: str, instead: str) -> Iterator[None]:
        """Say so when a request names an allowlisted function as a model: the lookup's
        NOT_FOUND lists models only, and the caller most likely wanted the function."""
        try:
            yield
        except NotFoundError as exc:
            better = self._function_named(name, instead)
            if better is None:
                raise
            raise better from exc

    def _function_named(self, name: str, instead: str) -> NotFoundError | None:
        """``_a_model``'s error for ``name``, if it names a function and no model."""
        engine = self.engine
        if name in engine.registry or name not in engine.functions:
            return None
        return NotFoundError(f"{shown(name)} is an allowlisted function, not a model: {instead}")

    @property
    def _control(self) -> ModelControl:
        if self.control is None:
            raise FailedPreconditionError("this server cannot load or unload models")
        return self.control

    # ------------------------------------------------------------------ computing

    def infer(
        self,
        caller: Caller,
        model: str,
        inputs: Named[Any],
        outputs: Sequence[str] = (),
        version: int = 0,
        keep: bool = False,
        export: Export | None = None,
    ) -> Inference:
        """Run ``model`` forward (batched with other requests where configured) within
        the caller's deadline; ``keep``: its outputs stay in the session as handles;
        ``export``: what becomes of each output instead (it runs alone)."""
        try:  # _a_model, written out: every small call passes here
            return self.engine.infer(
                model,
                inputs,
                outputs,
                version,
                caller.deadline,
                self._keeper(caller) if keep else export,
            )
        except NotFoundError as exc:
            better = self._function_named(model, "run it with Call")
            if better is None:
                raise
            raise better from exc

    async def infer_async(
        self,
        caller: Caller,
        model: str,
        inputs: Named[Any],
        outputs: Sequence[str],
        version: int,
        run: Runner,
    ) -> Inference:
        """``infer`` from the event loop, for a batched model: the request waits as a
        task, its batch runs through ``run``. Outputs are never kept (``keep`` runs
        alone, through ``infer``)."""
        with self._a_model(model, "run it with Call"):
            return await self.engine.infer_async(
                model, inputs, outputs, version, caller.deadline, run
            )

    def grad_model(
        self,
        caller: Caller,
        model: str,
        inputs: Named[Any],
        wrt: Sequence[str] = (),
        grad_outputs: Sequence[tuple[str, np.ndarray]] = (),
        param_grads: bool = False,
        version: int = 0,
        keep: bool = False,
    ) -> GradOutcome:
        """``model``'s outputs and gradients w.r.t. inputs ``wrt`` (and parameters)."""
        export = self._keeper(caller) if keep else as_array
        with self._a_model(model, "its gradients come from Grad naming a function (call_grad)"):
            return self.engine.grad_model(
                model, inputs, wrt, grad_outputs, param_grads, version, export
            )

    def grad_function(
        self,
        caller: Caller,
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        wrt: Sequence[str] = (),
        grad_outputs: Sequence[tuple[str, np.ndarray]] = (),
        keep: bool = False,
    ) -> GradOutcome:
        """A function's outputs and gradients w.r.t. its positional tensor arguments."""
        programs.no_refs(args, kwargs)
        export = self._keeper(caller) if keep else as_array
        return self.engine.grad_function(function, args, kwargs, wrt, grad_outputs, export)

    def call(
        self,
        caller: Caller,
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        keep: bool = False,
    ) -> Named[Any]:
        """Run one allowlisted function."""
        programs.no_refs(args, kwargs)
        export = self._keeper(caller) if keep else as_array
        return self.engine.call(function, args, kwargs, export)

    def run(
        self, caller: Caller, plan: ProgramPlan, keep: bool = False, free: Sequence[str] = ()
    ) -> ProgramOutcome:
        """Run a program (differentiated end to end when it names a loss); ``keep``:
        its outputs and gradients stay in the session as handles, as its ``kept`` refs
        always do. A call that fails keeps nothing: handles it made are freed. ``free``:
        ids the caller let go of, freed first (those the session lacks are ignored)."""
        if free:
            # Only the ids are let off: a session that is gone is still NOT_FOUND.
            self.workspace(caller).free(free, missing_ok=True)
        if not keep and not plan.kept:
            return programs.run(self.engine, plan, as_array)
        workspace = self.workspace(caller)  # FAILED_PRECONDITION before anything runs
        made: list[str] = []

        def keeper(name: str, tensor: torch.Tensor) -> Handle:
            handle = workspace.keep(name, tensor)
            made.append(handle.id)
            return handle

        try:
            return programs.run(self.engine, plan, keeper if keep else as_array, keeper)
        except BaseException:
            with suppress(TensorwireError):  # the session may have ended meanwhile
                workspace.free(made)
            raise

    # ------------------------------------------------------------------ sessions

    def open_session(self, caller: Caller) -> Session:
        """A new session, owned by the caller."""
        return self.sessions.open(caller.identity)

    def close_session(self, caller: Caller) -> int:
        """End the caller's session, freeing what it holds; the bytes freed."""
        return self.sessions.close(self._session(caller))

    def workspace(self, caller: Caller) -> Workspace:
        """The caller's session, to keep, fetch and free tensors and to train in;
        FAILED_PRECONDITION when the call names no session, NOT_FOUND when the caller
        has no such session."""
        return Workspace(self.engine, self._session(caller))

    def resolver(self, caller: Caller) -> Resolve:
        """Resolves handles to the caller's session's tensors; the session is looked up
        at the first handle, so requests without handles need none."""
        found: list[Workspace] = []

        def resolve(handle: Handle, name: str) -> torch.Tensor:
            if not found:
                found.append(self.workspace(caller))
            return found[0].tensor(handle.id, name)

        return resolve

    def region_owner(self, caller: Caller, registering: bool = False) -> str:
        """Whose shared-memory regions a call sees: its caller's (the token's), or,
        when it names a session, that session's, which are let go when the session
        ends (``registering``: see that they are)."""
        if not caller.session:
            return owner_of(caller.identity)
        session = self._session(caller)
        owner = owner_of(caller.identity, session.id)
        if registering:
            session.on_close("shared memory", partial(self.regions.forget, owner))
        return owner

    def _keeper(self, caller: Caller) -> Export:
        """An Export keeping results in the caller's session as handles."""
        return self.workspace(caller).keep

    def _session(self, caller: Caller) -> Session:
        if not caller.session:
            raise FailedPreconditionError(
                f"this call needs a session: call OpenSession, then send its id as "
                f"metadata {SESSION_KEY!r}"
            )
        return self.sessions.get(caller.session, caller.identity)


__all__ = ["Caller", "ServerInfo", "Service", "SessionsSummary"]
