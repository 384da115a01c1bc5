"""Loading a model, one way for every place that names one: ``--model NAME=SOURCE``
(``load_model``) and a repository's version folders (``load_version``).

A model is read from a TorchScript file, a ``torch.export`` file or an AOTInductor
package (both ``.pt2``; each file's contents tell which it is), or built by
a factory: ``package.module:function`` (imported) or, for a repository's model only,
``file.py:function`` (a file in the model's folder), returning an ``nn.Module`` (its
``forward`` tells the signature) or a ``Model`` (with a signature of its own). A
version's ``model.safetensors`` holds weights for the module its factory builds. Files
and factories come from the operator: nothing here is ever read from a client.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server.device.tensors import dtype_name
from tensorwire_server.models.aotinductor import INFERENCE_ONLY, file_format, read_package
from tensorwire_server.models.config import CONFIG_FILE, ConfigError, ModelConfig
from tensorwire_server.models.model import IOSpec, Model, forward_signature
from tensorwire_server.models.repository import model_folder, version_file

#: What each kind of model file is called in descriptions and errors.
KIND_LABELS = {
    "torchscript": "TorchScript model",
    "export": "torch.export program",
    "aotinductor": "AOTInductor package",
    "safetensors": "safetensors weights",
}


# ----------------------------------------------------------------------------- --model


def load_model(name: str, source: str) -> Model:
    """Load ``source`` as model ``name``: a TorchScript file, a torch.export file or an
    AOTInductor package (told apart by their contents), or ``package.module:function``
    (operator-trusted Python returning an ``nn.Module`` or a ``Model``). Raises
    ValueError naming the model and the problem."""
    if os.path.isfile(source):
        try:
            model = read_model_file(name, source)
        except Exception as exc:
            what = "torch.export or AOTInductor" if source.endswith(".pt2") else "TorchScript"
            raise ValueError(f"model {name!r}: cannot load {what} {source!r}: {exc}") from exc
        model.description = f"{KIND_LABELS[model.kind]} from {source}"
        return model
    if ":" in source and os.path.sep not in source:
        try:
            return build_model(name, source)
        except ValueError as exc:
            raise ValueError(f"model {name!r}: {exc}") from exc
    if source.endswith(".pt2"):
        raise ValueError(f"model {name!r}: no such file {source!r}")
    raise ValueError(f"model {name!r}: {source!r} is not a file nor a module:factory")


# ----------------------------------------------------------------------------- repository


def load_version(config: ModelConfig, version: int) -> Model:
    """Load one version's module onto the CPU (in eval mode) with the signature the
    config declares (or the file carries); ConfigError names the file and reason."""
    file, kind = version_file(config, version)
    try:
        if kind == "safetensors":
            read = _load_weights(config, file)
        else:
            read = read_model_file(config.name, file)
            kind = read.kind
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{file}: cannot load the {KIND_LABELS[kind]}: {type(exc).__name__}: {exc}"
        ) from exc
    module = read.module
    module.to("cpu")
    # torch.export modules keep the mode they were exported in.
    with suppress(NotImplementedError):
        module.eval()
    if kind == "safetensors":
        description = f"{config.factory} with weights from {file}"
    else:
        description = f"{KIND_LABELS[kind]} from {file}"
    return Model(
        name=config.name,
        module=module,
        inputs=config.inputs or read.inputs,
        outputs=config.outputs or read.outputs,
        kind=kind,
        description=config.description or description,
        variadic=config.variadic or (read.variadic and not config.inputs),
        extra={"version": version, "file": file},
        inference_only=read.inference_only,
    )


def _load_weights(config: ModelConfig, file: Path) -> Model:
    """The model the config's factory builds, its module holding the weights of
    ``file`` (loaded strictly)."""
    from safetensors.torch import load_file  # the server extra's; only weights need it

    folder = model_folder(config)
    if config.factory is None:
        raise ConfigError(
            f"{file}: weights need a factory building their module "
            f'(factory = "model.py:build" in {folder / CONFIG_FILE})'
        )
    try:
        built = build_model(config.name, config.factory, folder)
    except ValueError as exc:
        raise ConfigError(f"{file}: {exc}") from exc
    weights = load_file(file, device="cpu")
    try:
        built.module.load_state_dict(weights, strict=True)
    except Exception as exc:
        raise ConfigError(
            f"{file}: the weights do not fit the module factory {config.factory!r} builds: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return built


# ----------------------------------------------------------------------------- files


def read_model_file(name: str, path: str | os.PathLike[str]) -> Model:
    """The model a TorchScript, torch.export or AOTInductor file holds (its contents
    tell which), with the signature it carries; raises whatever loading raises."""
    kind = file_format(path)
    if kind == "aotinductor":
        package, inputs, outputs = read_package(path)
        return Model(name, package, inputs, outputs, kind, inference_only=INFERENCE_ONLY)
    module, read = read_file(path, kind)
    return Model(name, module, read, (), kind)


def read_file(path: str | os.PathLike[str], kind: str) -> tuple[nn.Module, tuple[IOSpec, ...]]:
    """A ``torchscript`` or ``export`` file's module and the inputs it tells; raises
    whatever loading raises."""
    if kind == "torchscript":
        return _read_torchscript(path)
    if kind == "export":
        return _read_export(path)
    raise ValueError(f"{kind!r} is not a kind of model file read alone")


def _read_torchscript(path: str | os.PathLike[str]) -> tuple[nn.Module, tuple[IOSpec, ...]]:
    """A TorchScript file's module (on the CPU) and its inputs, named after the
    arguments of its ``forward``."""
    module = torch.jit.load(path, map_location="cpu")  # type: ignore[no-untyped-call]
    arguments = module.forward.schema.arguments[1:]  # the first is self
    return module, tuple(IOSpec(a.name) for a in arguments)


def _read_export(path: str | os.PathLike[str]) -> tuple[nn.Module, tuple[IOSpec, ...]]:
    """A torch.export file's module and its inputs, with the dtypes and shapes it was
    exported for."""
    program = torch.export.load(path)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = tuple(
        _spec_from_meta(user_input, placeholders[user_input].meta.get("val"))
        for user_input in program.graph_signature.user_inputs
        if isinstance(user_input, str)
    )
    return program.module(), inputs


def _spec_from_meta(name: str, value: Any) -> IOSpec:
    if not isinstance(value, torch.Tensor):
        return IOSpec(name)
    dtype = dtype_name(value)
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return IOSpec(name, dtype if dtype in WIRE_BY_NAME else None, shape)


# ----------------------------------------------------------------------------- factories


def build_model(name: str, factory: str, folder: Path | None = None) -> Model:
    """The model ``factory`` builds, named ``name``: a ``Model`` it returns keeps its
    signature, an ``nn.Module`` gets the one its ``forward`` tells. ``folder`` is the
    repository model's, which ``file.py:function`` factories are read from. ValueError
    (naming the factory) when it cannot be resolved, fails or returns something else."""
    source = factory.rpartition(":")[0]
    if source.endswith(".py") and folder is None:
        raise ValueError(
            f"factory {factory!r}: a file.py:function factory is read from a model's "
            "folder, so only a model repository's model.toml may name one; "
            "elsewhere name package.module:function"
        )
    try:
        made = _resolve_factory(factory, folder)()
    except Exception as exc:
        raise ValueError(f"factory {factory!r} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(made, Model):
        made.name = name
        return made
    if not isinstance(made, nn.Module):
        raise ValueError(f"factory {factory!r} returned {type(made).__name__}, not a Module")
    inputs, variadic = forward_signature(made)
    description = f"Python model from {factory}"
    return Model(name, made, inputs, (), "python", description, variadic=variadic)


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Imports a model folder's Python file without writing ``__pycache__`` into the
    operator's folder."""

    def set_data(self, path: str, data: object, *, _mode: int = 0o666) -> None:
        pass


def _resolve_factory(factory: str, folder: Path | None = None) -> Callable[[], object]:
    """The function ``factory`` names: ``file.py:function`` is run from ``folder`` as a
    module of its own (fresh on every call: an updated file is read again),
    ``package.module:function`` is imported. Raises whatever importing raises."""
    source, _, attr = factory.rpartition(":")
    if source.endswith(".py"):
        assert folder is not None  # build_model refuses a file factory without one
        path = (folder / source).resolve()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module_name = "tensorwire_model_" + re.sub(r"\W", "_", f"{path.stem}_{digest}")
        loader = _SourceOnlyLoader(module_name, str(path))
        spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    else:
        module = importlib.import_module(source)
    function = getattr(module, attr)
    if not callable(function):
        raise TypeError(f"{factory} is a {type(function).__name__}, not a function")
    return function  # type: ignore[no-any-return]
