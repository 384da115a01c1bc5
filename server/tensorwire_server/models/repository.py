"""The model repository: folders of numbered versions, each model described by a
``model.toml``; reading the configuration and loading a version's files.

A repository is a directory; each model is a sub-folder holding ``model.toml`` and
numbered version folders (``1/``, ``2/``, ...). A version folder holds exactly one of
``model.pt`` (TorchScript), ``model.pt2`` (``torch.export``) or ``model.safetensors``
(weights for the module the config's ``factory`` builds). Model files come from the
operator: nothing here is ever read from a client.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import math
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server.models.model import (
    IOSpec,
    Model,
    forward_signature,
    read_export,
    read_torchscript,
)

CONFIG_FILE = "model.toml"
PRECISIONS = ("float32", "float16", "bfloat16")
FILLS = ("zeros", "ones", "random")
#: The files a version folder may hold (exactly one of), and the kind each loads as.
MODEL_FILES = {"model.pt": "torchscript", "model.pt2": "export", "model.safetensors": "safetensors"}


class ConfigError(ValueError):
    """A model.toml (or a version folder) that cannot be served, with the reason."""


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: how long a batch's first request may wait for company, and
    the batch sizes (rows) worth running at once."""

    max_queue_delay: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class WarmupInput:
    """One input of a warm-up request: a shape, a dtype, and how to fill it."""

    shape: tuple[int, ...]
    dtype: str
    fill: str = "zeros"


@dataclass(frozen=True)
class ModelConfig:
    """Everything ``model.toml`` says about a model (defaults for the rest)."""

    name: str
    description: str = ""
    #: The signature; empty: taken from the model file where it carries one.
    inputs: tuple[IOSpec, ...] = ()
    outputs: tuple[IOSpec, ...] = ()
    #: Most rows (first dimension) per forward pass; 0: no batch dimension.
    max_batch_size: int = 0
    #: Dynamic batching; None: every request runs its own forward pass.
    batching: Batching | None = None
    #: Instances per device.
    instances: int = 1
    #: Devices to place instances on ("cpu", "cuda" for every visible GPU, "cuda:N");
    #: empty: the server's device (every visible GPU when that is CUDA).
    devices: tuple[str, ...] = ()
    #: float32, or float16/bfloat16 under torch.autocast.
    precision: str = "float32"
    #: Requests waiting for (or running on) the model at once; more are refused.
    max_queue_size: int = 1024
    #: Warm-up requests run on every instance before it serves.
    warmup: tuple[dict[str, WarmupInput], ...] = ()
    #: "module:function" or "file.py:function" (relative to the model's folder)
    #: building the nn.Module that safetensors weights are loaded into.
    factory: str | None = None
    #: Which version folders to serve: "all", "latest:N", or explicit numbers.
    versions: str | tuple[int, ...] = "all"
    #: The model's folder; None for built-ins.
    path: Path | None = None
    #: The model's inputs are keyword arguments of any names (built-in echo).
    variadic: bool = False

    @classmethod
    def of(cls, model: Model, **settings: Any) -> ModelConfig:
        """The configuration of a model loaded outside a repository: its own name,
        description and signature, with ``settings`` for the rest."""
        return cls(
            model.name,
            model.description,
            model.inputs,
            model.outputs,
            variadic=model.variadic,
            **settings,
        )


def model_names(root: Path) -> list[str]:
    """The models of a repository: its sub-folders holding a model.toml, sorted."""
    if not root.exists():
        raise ConfigError(f"{root}: model repository does not exist")
    if not root.is_dir():
        raise ConfigError(f"{root}: model repository is not a directory")
    try:
        return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())
    except OSError as exc:
        raise ConfigError(f"{root}: cannot list the model repository: {exc}") from exc


# ----------------------------------------------------------------------------- model.toml

_KEYS = (
    "description",
    "max_batch_size",
    "instances",
    "devices",
    "precision",
    "max_queue_size",
    "factory",
    "versions",
    "inputs",
    "outputs",
    "dynamic_batching",
    "warmup",
)
_SPEC_KEYS = ("name", "dtype", "shape")
_BATCHING_KEYS = ("max_queue_delay_ms", "preferred_batch_sizes")
_WARMUP_KEYS = ("shape", "dtype", "fill")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_LATEST = re.compile(r"latest:(\d+)")
_VERSIONS = 'must be "all", "latest:N" (N >= 1) or a list of version numbers'


def read_config(folder: Path) -> ModelConfig:
    """Parse ``folder/model.toml``; ConfigError names the file, the key and the
    problem for anything unknown, mistyped or out of range."""
    file = folder / CONFIG_FILE
    try:
        with file.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{file}: missing (every model folder needs one)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {type(exc).__name__}: {exc}") from exc
    check = _Checker(file)
    check.known("", raw, _KEYS)

    description = check.string("description", raw.get("description", ""))
    max_batch_size = check.integer("max_batch_size", raw.get("max_batch_size", 0), 0)
    instances = check.integer("instances", raw.get("instances", 1), 1)
    devices = check.devices(raw.get("devices", []))
    precision = check.choice("precision", raw.get("precision", "float32"), PRECISIONS)
    max_queue_size = check.integer("max_queue_size", raw.get("max_queue_size", 1024), 1)
    factory = check.factory(raw.get("factory"))
    versions = check.versions(raw.get("versions", "all"))
    inputs = check.specs("inputs", raw.get("inputs", []), max_batch_size)
    outputs = check.specs("outputs", raw.get("outputs", []), max_batch_size)
    batching = check.batching(raw.get("dynamic_batching"), max_batch_size)
    warmup = check.warmup(raw.get("warmup", []), inputs, max_batch_size)
    return ModelConfig(
        name=folder.name,
        description=description,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        batching=batching,
        instances=instances,
        devices=devices,
        precision=precision,
        max_queue_size=max_queue_size,
        warmup=warmup,
        factory=factory,
        versions=versions,
        path=folder,
    )


def _show(value: object) -> str:
    """A value as the error message shows it: TOML's spelling, cut short."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Checks the parts of one model.toml; every error names the file and the key."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {message}")

    def wrong(self, key: str, what: str, value: object) -> ConfigError:
        return self.error(f"{key} must be {what}, not {_show(value)}")

    def known(self, prefix: str, table: Mapping[str, object], keys: tuple[str, ...]) -> None:
        for key in table:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f": did you mean {prefix}{close[0]}?" if close else ""
                raise self.error(f"unknown key {prefix}{key}{hint} (known keys: {', '.join(keys)})")

    def table(self, key: str, value: object, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.wrong(key, "a table", value)
        self.known(f"{key}.", value, keys)
        return value

    def array(self, key: str, value: object, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.wrong(key, what, value)
        return value

    def integer(self, key: str, value: object, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.wrong(key, f"an integer >= {minimum}", value)
        return value

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.wrong(key, "a string", value)
        return value

    def choice(self, key: str, value: object, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.wrong(key, "one of " + ", ".join(choices), value)
        return value

    def devices(self, value: object) -> tuple[str, ...]:
        devices = self.array("devices", value, 'a list of "cpu", "cuda" or "cuda:N"')
        for i, device in enumerate(devices):
            if not isinstance(device, str) or not _DEVICE.fullmatch(device):
                raise self.wrong(f"devices[{i}]", '"cpu", "cuda" or "cuda:N"', device)
            if device in devices[:i]:
                raise self.error(f"devices[{i}] repeats {device!r}")
        return tuple(devices)

    def factory(self, value: object) -> str | None:
        if value is None:
            return None
        what = '"file.py:function" or "package.module:function"'
        if not isinstance(value, str):
            raise self.wrong("factory", what, value)
        source, _, function = value.rpartition(":")
        if not source or not function.isidentifier():
            raise self.wrong("factory", what, value)
        return value

    def versions(self, value: object) -> str | tuple[int, ...]:
        if isinstance(value, str):
            if value == "all":
                return value
            match = _LATEST.fullmatch(value)
            if match and int(match.group(1)) >= 1:
                return f"latest:{int(match.group(1))}"
            raise self.error(f"versions {_VERSIONS}, not {_show(value)}")
        if not isinstance(value, list) or not value:
            raise self.error(f"versions {_VERSIONS}, not {_show(value)}")
        for i, number in enumerate(value):
            self.integer(f"versions[{i}]", number, 1)
            if number in value[:i]:
                raise self.error(f"versions[{i}] repeats version {number}")
        return tuple(sorted(value))

    def shape(self, key: str, value: object, minimum: int) -> tuple[int, ...]:
        size_is = "-1 or a size >= 0" if minimum < 0 else "a size >= 0"
        shape = self.array(key, value, f"a list of sizes ({size_is} each)")
        for i, size in enumerate(shape):
            if isinstance(size, bool) or not isinstance(size, int) or size < minimum:
                raise self.wrong(f"{key}[{i}]", size_is, size)
        return tuple(shape)

    def dtype(self, key: str, value: object) -> str:
        if not isinstance(value, str) or value not in WIRE_BY_NAME:
            raise self.wrong(key, "a dtype (" + ", ".join(WIRE_BY_NAME) + ")", value)
        return value

    def specs(self, key: str, value: object, max_batch_size: int) -> tuple[IOSpec, ...]:
        tables = self.array(key, value, f"an array of tables ([[{key}]])")
        specs: list[IOSpec] = []
        for i, item in enumerate(tables):
            at = f"{key}[{i}]"
            table = self.table(at, item, _SPEC_KEYS)
            if "name" not in table:
                raise self.error(f"{at} needs a name")
            name = self.string(f"{at}.name", table["name"])
            if not name:
                raise self.wrong(f"{at}.name", "a non-empty string", name)
            for j, other in enumerate(specs):
                if other.name == name:
                    raise self.error(f"{at}.name {name!r} repeats {key}[{j}].name")
            dtype = self.dtype(f"{at}.dtype", table["dtype"]) if "dtype" in table else None
            shape = self.shape(f"{at}.shape", table["shape"], -1) if "shape" in table else None
            if shape is not None and max_batch_size > 0 and shape[:1] != (-1,):
                raise self.error(
                    f"{at}.shape must start with -1 (the batch dimension) when "
                    f"max_batch_size is {max_batch_size} > 0, not {list(shape)}"
                )
            specs.append(IOSpec(name, dtype, shape))
        return tuple(specs)

    def batching(self, value: object, max_batch_size: int) -> Batching | None:
        if value is None:
            return None
        table = self.table("dynamic_batching", value, _BATCHING_KEYS)
        if max_batch_size <= 0:
            raise self.error(
                "[dynamic_batching] needs max_batch_size > 0 (models without a batch "
                "dimension are never batched)"
            )
        key = "dynamic_batching.max_queue_delay_ms"
        delay = table.get("max_queue_delay_ms", 0.0)
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise self.wrong(key, "a number of milliseconds >= 0", delay)
        key = "dynamic_batching.preferred_batch_sizes"
        sizes = self.array(key, table.get("preferred_batch_sizes", []), "a list of batch sizes")
        for i, size in enumerate(sizes):
            self.integer(f"{key}[{i}]", size, 1)
            if size > max_batch_size:
                raise self.error(f"{key}[{i}] is {size}, more than max_batch_size {max_batch_size}")
        return Batching(delay / 1000, tuple(sorted(set(sizes))))

    def warmup(
        self, value: object, inputs: tuple[IOSpec, ...], max_batch_size: int
    ) -> tuple[dict[str, WarmupInput], ...]:
        requests = self.array("warmup", value, "an array of tables ([[warmup]])")
        declared = {spec.name: spec for spec in inputs}
        made: list[dict[str, WarmupInput]] = []
        for i, item in enumerate(requests):
            at = f"warmup[{i}]"
            if not isinstance(item, dict):
                raise self.wrong(at, "a table of input name = { shape = [...], ... }", item)
            if not item:
                raise self.error(f"{at} gives no inputs")
            missing = [name for name in declared if name not in item]
            if missing:
                raise self.error(f"{at} lacks the declared input(s) {', '.join(missing)}")
            request: dict[str, WarmupInput] = {}
            for name, table in item.items():
                spec = declared.get(name)
                if declared and spec is None:
                    raise self.error(
                        f"{at}.{name} is not a declared input (inputs: {', '.join(declared)})"
                    )
                request[name] = self.warmup_input(f"{at}.{name}", table, spec, max_batch_size)
            rows = {name: w.shape[0] for name, w in request.items()}
            if max_batch_size > 0 and len(set(rows.values())) > 1:
                shown = ", ".join(f"{name} {n}" for name, n in rows.items())
                raise self.error(f"{at} inputs need the same batch size (rows), not {shown}")
            made.append(request)
        return tuple(made)

    def warmup_input(
        self, at: str, value: object, spec: IOSpec | None, max_batch_size: int
    ) -> WarmupInput:
        table = self.table(at, value, _WARMUP_KEYS)
        if "shape" not in table:
            raise self.error(f"{at} needs a shape")
        shape = self.shape(f"{at}.shape", table["shape"], 0)
        if spec is not None and spec.shape is not None and not _fits(shape, spec.shape):
            raise self.error(
                f"{at}.shape {list(shape)} does not fit input {spec.name!r} of shape "
                f"{list(spec.shape)}"
            )
        if max_batch_size > 0 and (not shape or shape[0] > max_batch_size):
            raise self.error(
                f"{at}.shape {list(shape)} needs a batch dimension of at most "
                f"max_batch_size {max_batch_size} rows"
            )
        if "dtype" in table:
            dtype = self.dtype(f"{at}.dtype", table["dtype"])
            if spec is not None and spec.dtype is not None and dtype != spec.dtype:
                raise self.error(f"{at}.dtype is {dtype}, but input {spec.name!r} is {spec.dtype}")
        elif spec is not None and spec.dtype is not None:
            dtype = spec.dtype
        else:
            raise self.error(f"{at} needs a dtype (the input declares none)")
        fill = self.choice(f"{at}.fill", table.get("fill", "zeros"), FILLS)
        return WarmupInput(shape, dtype, fill)


def _fits(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    return len(shape) == len(spec) and all(s in (-1, n) for n, s in zip(shape, spec, strict=True))


# ----------------------------------------------------------------------------- versions


def version_numbers(config: ModelConfig) -> list[int]:
    """The version folders to serve under the config's policy, newest first;
    ConfigError when there is none."""
    folder = _folder(config)
    present: set[int] = set()
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot list the version folders: {exc}") from exc
    for entry in entries:
        name = entry.name
        if not (name.isascii() and name.isdigit()) or int(name) == 0 or not entry.is_dir():
            continue
        if str(int(name)) != name:
            raise ConfigError(f"{entry}: a version folder is named without leading zeros")
        present.add(int(name))
    if not present:
        raise ConfigError(f"{folder}: no version folders (1/, 2/, ...)")
    newest_first = sorted(present, reverse=True)
    policy = config.versions
    if policy == "all":
        return newest_first
    if isinstance(policy, str):
        match = _LATEST.fullmatch(policy)
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"{folder / CONFIG_FILE}: versions {_VERSIONS}, not {policy!r}")
        return newest_first[: int(match.group(1))]
    missing = [v for v in policy if v not in present]
    if missing:
        raise ConfigError(
            f"{folder / CONFIG_FILE}: versions lists {', '.join(map(str, missing))}, "
            f"but there is no such version folder in {folder}"
        )
    return sorted(set(policy), reverse=True)


def _folder(config: ModelConfig) -> Path:
    if config.path is None:
        raise ConfigError(f"model {config.name!r} has no folder (a built-in)")
    return config.path


# ----------------------------------------------------------------------------- loading

_KIND_LABELS = {
    "torchscript": "TorchScript model",
    "export": "torch.export program",
    "safetensors": "safetensors weights",
}


def load_version(config: ModelConfig, version: int) -> Model:
    """Load one version's module onto the CPU (in eval mode) with the signature the
    config declares (or the file carries); ConfigError names the file and reason."""
    folder = _folder(config) / str(version)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such version folder")
    found = [folder / name for name in MODEL_FILES if (folder / name).exists()]
    if not found:
        raise ConfigError(f"{folder}: holds none of {', '.join(MODEL_FILES)}")
    if len(found) > 1:
        names = " and ".join(f.name for f in found)
        raise ConfigError(f"{folder}: holds {names}; a version folder holds exactly one")
    file = found[0]
    kind = MODEL_FILES[file.name]
    outputs: tuple[IOSpec, ...] = ()
    variadic = False
    try:
        if kind == "torchscript":
            module, inputs = read_torchscript(file)
        elif kind == "export":
            module, inputs = read_export(file)
        else:
            module, inputs, outputs, variadic = _load_weights(config, file)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{file}: cannot load the {_KIND_LABELS[kind]}: {type(exc).__name__}: {exc}"
        ) from exc
    module.to("cpu")
    # torch.export modules keep the mode they were exported in.
    with suppress(NotImplementedError):
        module.eval()
    if kind == "safetensors":
        description = f"{config.factory} with weights from {file}"
    else:
        description = f"{_KIND_LABELS[kind]} from {file}"
    return Model(
        name=config.name,
        module=module,
        inputs=config.inputs or inputs,
        outputs=config.outputs or outputs,
        kind=kind,
        description=config.description or description,
        variadic=config.variadic or (variadic and not config.inputs),
        extra={"version": version, "file": file},
    )


def _load_weights(
    config: ModelConfig, file: Path
) -> tuple[nn.Module, tuple[IOSpec, ...], tuple[IOSpec, ...], bool]:
    """The module the factory builds with the weights of ``file`` loaded (strictly),
    and the signature the module tells."""
    from safetensors.torch import load_file  # the server extra's; only weights need it

    if config.factory is None:
        raise ConfigError(
            f"{file}: weights need a factory building their module "
            f'(factory = "model.py:build" in {_folder(config) / CONFIG_FILE})'
        )
    try:
        made = resolve_factory(config)()
    except Exception as exc:
        raise ConfigError(
            f"{file}: factory {config.factory!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(made, Model):
        module, inputs, outputs, variadic = made.module, made.inputs, made.outputs, made.variadic
    elif isinstance(made, nn.Module):
        module, outputs = made, ()
        inputs, variadic = forward_signature(module)
    else:
        raise ConfigError(
            f"{file}: factory {config.factory!r} returned {type(made).__name__}, not a Module"
        )
    weights = load_file(file, device="cpu")
    try:
        module.load_state_dict(weights, strict=True)
    except Exception as exc:
        raise ConfigError(
            f"{file}: the weights do not fit the module factory {config.factory!r} builds: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return module, inputs, outputs, variadic


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Imports a model folder's Python file without writing ``__pycache__`` into the
    operator's folder."""

    def set_data(self, path: str, data: object, *, _mode: int = 0o666) -> None:
        pass


def resolve_factory(config: ModelConfig) -> Callable[[], object]:
    """The function ``config.factory`` names: ``file.py:function`` is run from the
    model's folder as a module of its own (fresh on every call: an updated file is
    read again), ``package.module:function`` is imported."""
    if config.factory is None:
        raise ConfigError(f"model {config.name!r} has no factory")
    source, _, attr = config.factory.rpartition(":")
    if source.endswith(".py"):
        path = (_folder(config) / source).resolve()
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
        raise TypeError(f"{config.factory} is a {type(function).__name__}, not a function")
    return function  # type: ignore[no-any-return]
