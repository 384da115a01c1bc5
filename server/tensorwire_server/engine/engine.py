"""The torch engine: binds inputs, runs models and functions, takes gradients.

It knows nothing of gRPC: it takes and returns NumPy arrays and raises the
``tensorwire.errors`` classes, so it can be tested and reused without a transport.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TensorwireError,
    listed,
    shown,
)
from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server import timeline
from tensorwire_server.device.faults import DeviceHealth, Fault, Guard, classify
from tensorwire_server.device.tensors import dtype_name, is_differentiable, to_device, to_numpy
from tensorwire_server.engine.binding import (
    bind,
    declared_dtype,
    first_duplicate,
    invoke,
    name_outputs,
    select_outputs,
)
from tensorwire_server.engine.functions import FUNCTIONS, Function
from tensorwire_server.models.batching import Runner
from tensorwire_server.models.config import ModelConfig
from tensorwire_server.models.model import IOSpec, Model, trainable
from tensorwire_server.models.registry import Instance, ModelRegistry, ServedVersion
from tensorwire_server.named import Named

log = logging.getLogger(__name__)

#: Turns a result tensor into what the caller gets: by default a detached CPU NumPy
#: array; a session's ``keep`` stores it on the device and gives a Handle instead.
Export = Callable[[str, torch.Tensor], Any]
_MAX_MESSAGE = 2000  # characters of an exception message passed on to the client


def as_array(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The default Export: ``tensor.detach().cpu().numpy()``."""
    return to_numpy(tensor, name)


@dataclass(frozen=True)
class DeviceSummary:
    """The device the engine runs on, with its memory in bytes."""

    name: str
    description: str
    total_memory: int
    free_memory: int


@dataclass(frozen=True)
class Inference:
    """A model's outputs, the version that made them and the rows of the forward pass
    that ran them (more than the request's own when it was batched)."""

    outputs: Named[Any]
    version: int
    batch: int


@dataclass(frozen=True)
class GradOutcome:
    """Outputs, input gradients (named as asked) and parameter gradients."""

    outputs: Named[Any]
    grads: Named[Any]
    param_grads: Named[Any]
    version: int = 0


class Engine:
    """Runs models, gradients and allowlisted functions. Functions and requests'
    tensors live on ``device``; each model's instances on the devices its
    configuration (or ``devices``, by default just ``device``) names."""

    def __init__(
        self,
        device: torch.device,
        models: Mapping[str, Model] = {},
        functions: Mapping[str, Function] = FUNCTIONS,
        devices: Sequence[torch.device] = (),
    ) -> None:
        self.device = device
        self.functions = functions
        #: Hears, once, that the device failed for good (the server stops serving).
        self.on_device_failure: Callable[[str], None] | None = None
        #: Where every CUDA error that surfaces is reported (staging and regions too).
        self.health = DeviceHealth(device, self._failed)
        self.registry = ModelRegistry(devices or [device], self._forward)
        for model in models.values():
            self.serve(model)

    def serve(self, model: Model, config: ModelConfig | None = None, version: int = 1) -> None:
        """Serve one loaded model (as version 1, unbatched, by default)."""
        config = config or ModelConfig.of(model)
        self.registry.install(self.registry.serve(config, {version: model}))

    # ------------------------------------------------------------------ description

    def describe_device(self) -> DeviceSummary:
        """The device's name, description and memory now."""
        if self.device.type == "cuda":
            with self.device_guard("describing the device"):
                free, total = torch.cuda.mem_get_info(self.device)
            return DeviceSummary(
                str(self.device), torch.cuda.get_device_name(self.device), total, free
            )
        page = os.sysconf("SC_PAGE_SIZE")
        description = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        return DeviceSummary(
            "cpu",
            description,
            os.sysconf("SC_PHYS_PAGES") * page,
            os.sysconf("SC_AVPHYS_PAGES") * page,
        )

    # ------------------------------------------------------------------ operations

    def infer(
        self,
        model_name: str,
        inputs: Named[Any],
        outputs: Sequence[str] = (),
        version: int = 0,
        deadline: float | None = None,
        export: Export | None = None,
    ) -> Inference:
        """Run a model forward under inference mode (batched with other requests when
        its configuration says so); return the chosen outputs. ``version`` 0 runs the
        newest; ``deadline`` (``time.monotonic()``) bounds the time queued. An
        ``export`` (keeping outputs on the device) or a device tensor among the inputs
        runs the request alone."""
        with self.registry.using(model_name, version) as served:
            bound = bind(served.model, inputs)
            if export is None:
                if served.batcher is not None and not any(
                    isinstance(t, torch.Tensor) for _, t in bound
                ):
                    named, batch = served.batcher.submit(bound, deadline)
                else:  # the registry's forward is ours, exporting arrays
                    named, batch = served.run(bound, deadline)
            else:
                named, batch = served.run(
                    bound,
                    deadline,
                    lambda instance, tensors: self._forward(served, instance, tensors, export),
                )
            return Inference(select_outputs(named, outputs, served.name), served.version, batch)

    async def infer_async(
        self,
        model_name: str,
        inputs: Named[Any],
        outputs: Sequence[str],
        version: int,
        deadline: float | None,
        run: Runner,
    ) -> Inference:
        """``infer`` from the event loop: a batched model's request waits as a task and
        only its batch runs on a thread (through ``run``, Compute's); anything else runs
        whole through ``run``. The signature is checked on the loop either way."""
        with self.registry.using(model_name, version) as served:
            bound = bind(served.model, inputs)
            alone = any(isinstance(t, torch.Tensor) for _, t in bound)
            if served.batcher is None or alone:
                return await run(self.infer, model_name, inputs, outputs, version, deadline)  # type: ignore[no-any-return]
            named, batch = await served.batcher.submit_async(bound, deadline, run)
            return Inference(select_outputs(named, outputs, served.name), served.version, batch)

    def _forward(
        self,
        served: ServedVersion,
        instance: Instance,
        inputs: Named[Any],
        export: Export = as_array,
    ) -> Named[Any]:
        """One forward pass of ``served`` on ``instance``: arrays (or device tensors)
        in, ``export``-ed outputs out."""
        model = served.model
        what = f"model {model.name!r}"
        device = instance.device
        declared = model.outputs
        with self.health.guard(what), _no_grad(export), instance.context() as crossing:
            with timeline.phase(timeline.UPLOAD, device=device):
                tensors = [(n, crossing.inward(to_device(arr, device))) for n, arr in inputs]
            with (
                _autocast(device, served.autocast),
                timeline.phase(timeline.FORWARD, device=device),
            ):
                result = self.user_code(what, invoke, model, instance.module, tensors)
            named = name_outputs(result, declared, what)
            with timeline.phase(timeline.DOWNLOAD, device=device):
                return [
                    (n, export(n, crossing.outward(declared_dtype(t, n, declared))))
                    for n, t in named
                ]

    def call(
        self,
        function_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        export: Export = as_array,
    ) -> Named[Any]:
        """Run one allowlisted function; tensors in ``args``/``kwargs`` are arrays or
        device tensors."""
        function = self.function(function_name)
        what = f"function {function.name!r}"
        with self.device_guard(what), _no_grad(export):
            with timeline.phase(timeline.UPLOAD, device=self.device):
                targs, tkwargs = self.torch_arguments(args, kwargs)
            with timeline.phase(timeline.FORWARD, device=self.device):
                result = self.user_code(what, lambda: function(*targs, **tkwargs))
            with timeline.phase(timeline.DOWNLOAD, device=self.device):
                return [(n, export(n, t)) for n, t in name_outputs(result, (), what)]

    def grad_model(
        self,
        model_name: str,
        inputs: Named[Any],
        wrt: Sequence[str] = (),
        grad_outputs: Sequence[tuple[str, np.ndarray]] = (),
        param_grads: bool = False,
        version: int = 0,
        export: Export = as_array,
    ) -> GradOutcome:
        """Outputs of ``model_name`` and gradients w.r.t. inputs ``wrt`` (and parameters).
        Never batched: each request runs its own forward and backward pass."""
        with self.registry.using(model_name, version) as served:
            model = served.model
            if model.inference_only:
                raise FailedPreconditionError(
                    f"model {model.name!r} cannot take gradients: {model.inference_only}"
                )
            bound = bind(model, inputs)
            what = f"model {model.name!r}"
            with (
                served.alone(bound) as instance,
                self.device_guard(what),
                instance.context() as crossing,
            ):
                with timeline.phase(timeline.UPLOAD, device=instance.device):
                    leaves = [(n, crossing.inward(to_device(a, instance.device))) for n, a in bound]
                params = list(trainable(instance.module)) if param_grads else []
                with _autocast(instance.device, served.autocast):
                    outcome = self._grad(
                        what,
                        lambda tensors: invoke(model, instance.module, tensors),
                        leaves,
                        wrt,
                        grad_outputs,
                        params,
                        model.outputs,
                        lambda name, tensor: export(name, crossing.outward(tensor)),
                    )
            return replace(outcome, version=served.version)

    def grad_function(
        self,
        function_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        wrt: Sequence[str] = (),
        grad_outputs: Sequence[tuple[str, np.ndarray]] = (),
        export: Export = as_array,
    ) -> GradOutcome:
        """Outputs of a function and gradients w.r.t. its positional tensor arguments,
        named by position ("0", "1", ...)."""
        function = self.function(function_name)
        what = f"function {function.name!r}"
        with self.device_guard(what):
            targs, tkwargs = self.torch_arguments(args, kwargs)
            positions = [i for i, a in enumerate(targs) if isinstance(a, torch.Tensor)]
            leaves = [(str(i), targs[i]) for i in positions]

            def run(tensors: list[tuple[str, torch.Tensor]]) -> Any:
                call_args = list(targs)
                for i, (_, tensor) in zip(positions, tensors, strict=True):
                    call_args[i] = tensor
                return function(*call_args, **tkwargs)

            return self._grad(what, run, leaves, wrt, grad_outputs, [], (), export)

    # ------------------------------------------------------------------ internals

    def function(self, name: str) -> Function:
        """An allowlisted function by name; NOT_FOUND if it is not on the allowlist."""
        try:
            return self.functions[name]
        except KeyError:
            raise NotFoundError(
                f"function {shown(name)} is not on the allowlist; Info lists the "
                f"{len(self.functions)} functions"
            ) from None

    def torch_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Call arguments with every array (or held tensor) a tensor on the device."""
        if "out" in kwargs:
            # On the CPU inputs alias the request's bytes; out= would write into them.
            raise InvalidArgumentError("argument 'out' is not allowed: results come back new")
        targs = [self.torch_value(a) for a in args]
        tkwargs = {k: self.torch_value(v) for k, v in kwargs.items()}
        if isinstance(tkwargs.get("dtype"), str):
            name = tkwargs["dtype"]
            if name not in WIRE_BY_NAME:
                raise InvalidArgumentError(f"argument 'dtype': unknown dtype {shown(name)}")
            tkwargs["dtype"] = getattr(torch, name)
        return targs, tkwargs

    def torch_value(self, value: Any) -> Any:
        """An argument with arrays (and held tensors) as tensors on the device."""
        if isinstance(value, np.ndarray | torch.Tensor):
            return to_device(value, self.device)
        if isinstance(value, list):
            return [self.torch_value(v) for v in value]
        return value

    def _grad(
        self,
        what: str,
        run: Callable[[list[tuple[str, torch.Tensor]]], Any],
        leaves: list[tuple[str, torch.Tensor]],
        wrt: Sequence[str],
        grad_outputs: Sequence[tuple[str, np.ndarray]],
        params: list[tuple[str, torch.nn.Parameter]],
        declared: tuple[IOSpec, ...],
        export: Export,
    ) -> GradOutcome:
        by_name = dict(leaves)
        if wrt:
            for name in wrt:
                if name not in by_name:
                    raise InvalidArgumentError(
                        f"wrt names {shown(name)}, which is not an input of {what}; inputs: "
                        f"{listed(by_name) or 'none'}"
                    )
            repeated = first_duplicate(wrt)
            if repeated is not None:
                raise InvalidArgumentError(f"wrt names {shown(repeated)} more than once")
        else:
            wrt = [n for n, t in leaves if is_differentiable(t)]
            if not wrt and not params:
                dtypes = listed(f"input {shown(n)} has dtype {dtype_name(t)}" for n, t in leaves)
                raise FailedPreconditionError(
                    f"{what} has no floating point input to differentiate: {dtypes or 'no inputs'}"
                )
        for name in wrt:
            if not is_differentiable(by_name[name]):
                raise FailedPreconditionError(
                    f"input {shown(name)} has dtype {dtype_name(by_name[name])}; "
                    "gradients need a floating point or complex input"
                )
        wanted = set(wrt)
        tensors = [(n, t.detach().requires_grad_(True) if n in wanted else t) for n, t in leaves]
        # In wrt's order, which names the gradients, whatever the inputs' order.
        prepared = dict(tensors)
        sources = [prepared[n] for n in wrt] + [p for _, p in params]
        device = self.device
        with torch.enable_grad():
            with timeline.phase(timeline.FORWARD, device=device):
                result = self.user_code(what, lambda: run(tensors))
            named = name_outputs(result, declared, what)
            roots, seeds = self._grad_roots(named, grad_outputs, what)
            if roots:
                with timeline.phase(timeline.BACKWARD, device=device):
                    grads = self.user_code(
                        f"gradient of {what}",
                        lambda: torch.autograd.grad(
                            roots, sources, seeds, allow_unused=True, materialize_grads=True
                        ),
                    )
            else:  # no output depends differentiably on anything: every gradient is zero
                grads = tuple(torch.zeros_like(s) for s in sources)
        names = [*wrt, *(n for n, _ in params)]
        with timeline.phase(timeline.DOWNLOAD, device=device):
            pairs = [(n, export(n, g)) for n, g in zip(names, grads, strict=True)]
            outputs = [(n, export(n, t.detach())) for n, t in named]
        return GradOutcome(outputs=outputs, grads=pairs[: len(wrt)], param_grads=pairs[len(wrt) :])

    def _grad_roots(
        self,
        named: list[tuple[str, torch.Tensor]],
        grad_outputs: Sequence[tuple[str, np.ndarray]],
        what: str,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The outputs to differentiate and the vector for each."""
        outputs = dict(named)
        if not grad_outputs:
            if len(named) != 1 or named[0][1].numel() != 1:
                shapes = listed(f"{n} {list(t.shape)}" for n, t in named)
                raise InvalidArgumentError(
                    f"{what} has outputs {shapes}; without grad_outputs the single output "
                    "must be a scalar"
                )
            name, out = named[0]
            pairs = [(out, torch.ones_like(out))]
        else:
            pairs = []
            for name, arr in grad_outputs:
                if not name and len(named) == 1:
                    name = named[0][0]  # one unnamed vector for the one output
                if name not in outputs:
                    raise InvalidArgumentError(
                        f"grad_outputs names {shown(name)}, which is not an output of "
                        f"{what}; outputs: {listed(outputs)}"
                    )
                out = outputs[name]
                if tuple(arr.shape) != tuple(out.shape):
                    raise InvalidArgumentError(
                        f"grad_outputs {shown(name)} has shape {list(arr.shape)} but output "
                        f"{shown(name)} has shape {list(out.shape)}"
                    )
                # On the output's device: an instance may live on another GPU than the engine's.
                pairs.append((out, to_device(arr, out.device).to(out.dtype)))
        differentiable = [(o, s) for o, s in pairs if o.requires_grad]
        return [o for o, _ in differentiable], [s for _, s in differentiable]

    @staticmethod
    def user_code(what: str, thunk: Callable[..., Any], *args: Any) -> Any:
        """Run model, function or autograd code (``thunk(*args)``): its exceptions are
        the caller's input problem (INVALID_ARGUMENT) unless they concern the device
        (out of memory, a CUDA error: the guard around the request decides what those
        mean)."""
        try:
            return thunk(*args)
        except (TensorwireError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            if classify(exc) in _DEVICE_FAULTS:
                raise
            message = str(exc).strip()[:_MAX_MESSAGE]
            raise InvalidArgumentError(f"{what} raised {type(exc).__name__}: {message}") from exc

    def device_guard(self, what: str) -> Guard:
        """Work on the device: selected on this thread; out-of-memory anywhere in it
        RESOURCE_EXHAUSTED, once the failed request's memory is given back; a sticky
        CUDA error INTERNAL, the device failed for good (``on_device_failure`` hears it
        once, and every later request is refused)."""
        return self.health.guard(what)

    @property
    def failure(self) -> str | None:
        """Why the device failed for good; None while it serves."""
        return self.health.failure

    def _failed(self, reason: str) -> None:
        if self.on_device_failure is not None:
            self.on_device_failure(reason)


# A recoverable CUDA error (an invalid launch configuration from the request's shapes)
# is the request's problem, so it becomes INVALID_ARGUMENT like any other exception.
_DEVICE_FAULTS = (Fault.OUT_OF_MEMORY, Fault.STICKY, Fault.UNKNOWN)


def _no_grad(export: Export) -> Any:
    """Inference mode when results leave as arrays. Results a session keeps come from
    no_grad instead: inference-mode tensors could never enter autograd later."""
    return _inference_mode() if export is as_array else torch.no_grad()


# torch.inference_mode()'s __enter__ makes and enters this guard (torch is pinned):
# made directly, a small call spends ~1.5 µs less.
_inference_mode = partial(torch._C._InferenceMode, True)


_NO_AUTOCAST = nullcontext()  # reusable: it holds nothing


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Mixed precision for a model configured for it; nothing otherwise."""
    if dtype is None:
        return _NO_AUTOCAST
    return torch.autocast(device.type, dtype=dtype)


__all__ = ["DeviceSummary", "Engine", "Export", "GradOutcome", "as_array"]
