"""Compiled models: torch.compile done in warm-up, before a version serves, never on a
caller's request; AOTInductor packages placed on their devices; the on-disk cache that
lets a restarted server or a new replica skip compiling.

How a compiled instance runs: its module keeps its parameters, names and state (Grad,
training and Info see the same module); only its call goes through the compiled code,
in *run-only* mode once warm-up is over: inputs the warm-up did not compile for (a new
dtype, a grad-mode call not warmed up) run eagerly instead of compiling on a request.
The batch dimension (and every ``-1`` dimension of the signature) is compiled dynamic,
so any batch size within ``max_batch_size`` runs the graphs warm-up compiled.

The cache is Inductor's own (its FX graph and AOT autograd caches and compiled
kernels, under ``TORCHINDUCTOR_CACHE_DIR``), whose keys hash the graph's contents, the
inputs' shapes, dtypes and device, the compiler's configuration and the torch build;
tensorwire adds the torch version to the directory. A corrupt entry is a cache miss.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._dynamo.utils import counters

from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME
from tensorwire_server.models.aotinductor import AOTInductorModule
from tensorwire_server.models.config import ConfigError, ModelConfig
from tensorwire_server.models.model import CompileStats, Model

log = logging.getLogger(__name__)

#: One compilation at a time: dynamo's graph counter then tells whose graphs they are.
_COMPILING = threading.Lock()
#: Compiled graphs dynamo keeps per function before it stops compiling (its default,
#: 8, counts every model of one class together).
_RECOMPILE_LIMIT = 64

#: One warm-up request: its named arrays.
Request = list[tuple[str, np.ndarray]]
#: Runs one warm-up request on an instance.
Warm = Callable[[Any, Request], Any]
#: The dimensions compiled dynamic, by input position (or name, for a variadic model).
Dims = dict[int | str, tuple[int, ...]]


def use_cache_dir(root: str | os.PathLike[str] | None) -> Path | None:
    """Keep compiled artefacts under ``root`` (one folder per torch version), across
    restarts; None leaves Inductor's default (a folder under /tmp). Call before the
    first compilation. A folder that cannot be written is logged and Inductor's default
    used: the cache saves time, serving does not need it."""
    if root is None:
        return None
    folder = Path(root) / f"torch-{torch.__version__}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".written-by-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        log.error(
            "compile_cache_dir %s cannot be written (%s): compiled models are cached in "
            "Inductor's default folder instead, and compile again after a restart",
            os.fspath(root),
            exc,
        )
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return int(counters["stats"]["unique_graphs"])


class CompiledCall:
    """A module's call through torch.compile: compiling while ``warming``, run-only
    afterwards (counting any graph compiled meanwhile). Set as the module's
    ``_compiled_call_impl``; a deep copy of the module (a trainer's) runs eagerly."""

    def __init__(self, module: nn.Module, mode: str, dynamic: Dims, stats: CompileStats) -> None:
        options: dict[str, Any] = {"mode": None if mode == "default" else mode}
        # forward, not _call_impl: one code object per model class, not one for all.
        self.compiled = torch.compile(module.forward, **options)
        self.serving = torch._dynamo.run(module.forward)
        self.dynamic = dynamic
        self.stats = stats
        self.warming = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.warming:
            keyed: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
            for key, value in keyed:
                if not isinstance(value, torch.Tensor):
                    continue
                for dim in self.dynamic.get(key, ()):
                    # A size of 1 is never dynamic (dynamo specializes it).
                    if value.dim() > dim and value.shape[dim] > 1:
                        torch._dynamo.mark_dynamic(value, dim)
            return self.compiled(*args, **kwargs)
        busy = _COMPILING.locked()  # another version compiling: its graphs are not ours
        before = graphs_compiled()
        try:
            return self.serving(*args, **kwargs)
        finally:
            after = graphs_compiled()
            if after != before and not busy and not _COMPILING.locked():
                self.stats.recompilations += after - before

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # the copy's own forward runs eagerly (this one calls ours)


def prepare(config: ModelConfig, model: Model, instances: Sequence[Any], warm: Warm) -> None:
    """Make each instance (``device``, ``module``) ready to serve: an AOTInductor
    package loaded for its device; a model configured for torch.compile compiled by
    warm-up requests run through ``warm``. ConfigError when the version cannot serve
    as configured; a failed compilation falls back to eager (logged, and said in the
    description) unless ``on_failure`` is "fail"."""
    if isinstance(model.module, AOTInductorModule):
        if config.compile.enabled:
            raise ConfigError(
                "[compile] is for eager models; an AOTInductor package is compiled already"
            )
        # Loaded once per device: the instances on one device share its module (as
        # the registry places eager modules), not a copy of the weights each.
        placed: dict[Any, Any] = {}
        for instance in instances:
            module = placed.get(instance.device)
            if module is None:
                try:
                    module = placed[instance.device] = model.module.for_device(instance.device)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
            instance.module = module
        return
    mode = config.compile.mode
    if mode == "off":
        return
    if mode == "reduce-overhead":
        for instance in instances:
            if instance.device.type != "cuda":
                raise ConfigError(
                    "compile mode reduce-overhead records CUDA graphs, which run on CUDA "
                    f"only, and an instance is on {instance.device}: choose default or "
                    "max-autotune"
                )
    if isinstance(model.module, torch.jit.ScriptModule):
        raise ConfigError(
            "a TorchScript model cannot be compiled by torch.compile: export it with "
            "torch.export (a .pt2 file) or serve its Python module"
        )
    requests, dynamic = warmup_requests(config, model)
    stats = CompileStats(mode)
    modules = list({id(i.module): i for i in instances}.values())
    try:
        with _COMPILING:
            torch._dynamo.config.recompile_limit = max(
                torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT
            )
            began = time.monotonic()
            before, hits, misses = graphs_compiled(), *_cache_counts()
            for instance in modules:
                grad = config.compile.grad
                _compile(instance, mode, dynamic, stats, requests, warm, grad, model.variadic)
            stats.graphs = graphs_compiled() - before
            stats.cache_hits = _cache_counts()[0] - hits
            stats.cache_misses = _cache_counts()[1] - misses
            seconds = time.monotonic() - began
    except Exception as exc:
        for instance in modules:
            instance.module._compiled_call_impl = None
        cause = exc.__cause__ or exc  # the warm-up's request names the model's own error
        reason = f"torch.compile ({mode}) failed: {type(cause).__name__}: {_first_line(cause)}"
        if config.compile.on_failure == "fail":
            raise ConfigError(reason) from exc
        log.warning("model %r: %s; it runs eagerly", config.name, reason)
        model.description = f"{model.description} ({reason}; runs eagerly)".strip()
        return
    model.compile_stats = stats
    log.info(
        "model %r compiled (%s) in warm-up in %.1f s: %d graphs, %d found in the compile "
        "cache, %d not",
        config.name,
        mode,
        seconds,
        stats.graphs,
        stats.cache_hits,
        stats.cache_misses,
    )


def _compile(
    instance: Any,
    mode: str,
    dynamic: Dims,
    stats: CompileStats,
    requests: list[Request],
    warm: Warm,
    grad: bool,
    variadic: bool,
) -> None:
    module: nn.Module = instance.module
    call = CompiledCall(module, mode, dynamic, stats)
    module._compiled_call_impl = call
    call.warming = True
    try:
        for request in requests:
            warm(instance, request)
            if grad:
                _warm_grad(module, instance.device, request, variadic)
    finally:
        call.warming = False


def _warm_grad(module: nn.Module, device: torch.device, request: Request, variadic: bool) -> None:
    """Compile the graph Grad runs: a forward and backward with every floating
    input requiring gradients."""
    tensors = []
    for name, array in request:
        tensor = torch.from_numpy(array).to(device)
        if tensor.is_floating_point():
            tensor.requires_grad_(True)
        tensors.append((name, tensor))
    with torch.enable_grad():
        out = module(**dict(tensors)) if variadic else module(*(t for _, t in tensors))
        leaves = out if isinstance(out, tuple | list) else [out]
        roots = [o.float().sum() for o in leaves if isinstance(o, torch.Tensor) and o.requires_grad]
        if roots:
            torch.autograd.backward(roots)
    module.zero_grad(set_to_none=True)


def warmup_requests(config: ModelConfig, model: Model) -> tuple[list[Request], Dims]:
    """The requests warm-up compiles for, and the dimensions compiled dynamic (by
    input position, or name for a variadic model): the batch dimension and every
    ``-1`` of the signature. A batched model is warmed up with one row and with
    several, so that every batch size runs a graph compiled here."""
    specs = {s.name: s for s in model.inputs}
    if config.warmup:
        first = config.warmup[0]
        shapes = {name: (w.shape, w.dtype) for name, w in first.items()}
    elif specs and all(s.dtype is not None and s.shape is not None for s in specs.values()):
        shapes = {
            name: (tuple(2 if d < 0 else d for d in s.shape or ()), s.dtype or "float32")
            for name, s in specs.items()
        }
    else:
        raise ConfigError(
            "torch.compile compiles in warm-up, before the model serves: it needs "
            "[[warmup]] requests, or inputs that each declare a dtype and a shape"
        )
    batched = config.max_batch_size > 0
    dynamic: Dims = {}
    for position, (name, (shape, _)) in enumerate(shapes.items()):
        spec = specs.get(name)
        dims = {0} if batched and shape else set()
        if spec is not None and spec.shape is not None:
            dims |= {d for d, size in enumerate(spec.shape) if size < 0}
        dynamic[name if model.variadic else position] = tuple(sorted(dims))
    rows = [1, min(2, config.max_batch_size)] if batched else [None]
    requests = []
    for count in dict.fromkeys(rows):
        request = []
        for name, (shape, dtype) in shapes.items():
            sized = (count, *shape[1:]) if count is not None and shape else shape
            kind = np.dtype(NUMPY_BY_WIRE[WIRE_BY_NAME[dtype]]).kind
            # Zeros but for floats: valid indices, masks, ids.
            request.append(
                (name, warmup_array(sized, dtype, "random" if kind in "fc" else "zeros"))
            )
        requests.append(request)
    return requests, dynamic


def warmup_array(shape: tuple[int, ...], dtype: str, fill: str) -> np.ndarray:
    """A warm-up input of ``shape`` and wire ``dtype``, filled with zeros, ones, or a
    fixed random normal draw ("random")."""
    np_dtype = NUMPY_BY_WIRE[WIRE_BY_NAME[dtype]]
    if fill == "ones":
        return np.ones(shape, np_dtype)
    if fill == "random":
        return np.random.default_rng(0).standard_normal(shape).astype(np_dtype)
    return np.zeros(shape, np_dtype)


def _cache_counts() -> tuple[int, int]:
    """Inductor's compile-cache lookups so far in this process: hits and misses."""
    inductor = counters["inductor"]
    return int(inductor["fxgraph_cache_hit"]), int(inductor["fxgraph_cache_miss"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:500]
