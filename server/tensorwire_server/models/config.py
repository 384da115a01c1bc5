"""A model's ``model.toml``: what it may say (``ModelConfig``), reading it, and the
checks that name the file, the key and the problem (``ConfigError``)."""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server.models.model import IOSpec, Model
from tensorwire_server.settings import COMPILE_MODES  # torch.compile's modes, and "off"

CONFIG_FILE = "model.toml"
PRECISIONS = ("float32", "float16", "bfloat16")
FILLS = ("zeros", "ones", "random")
#: What a version does when compiling it fails: serve eagerly (logged) or fail to load.
COMPILE_FAILURES = ("eager", "fail")


class ConfigError(ValueError):
    """A model.toml (or a version folder) that cannot be served, with the reason."""


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: how long a batch's first request may wait for company, and
    the batch sizes (rows) worth running at once."""

    max_queue_delay: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Compilation:
    """torch.compile for a model: the mode ("off": eager), what a failure does, and
    whether warm-up also compiles the graph Grad runs (forward and backward)."""

    mode: str = "off"
    on_failure: str = "eager"
    grad: bool = False

    @property
    def enabled(self) -> bool:
        """Whether the model is compiled at all."""
        return self.mode != "off"


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
    #: torch.compile, done in warm-up before the version serves ([compile]).
    compile: Compilation = Compilation()

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
    "compile",
)
_COMPILE_KEYS = ("mode", "on_failure", "grad")
_SPEC_KEYS = ("name", "dtype", "shape")
_BATCHING_KEYS = ("max_queue_delay_ms", "preferred_batch_sizes")
_WARMUP_KEYS = ("shape", "dtype", "fill")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_LATEST = re.compile(r"latest:(\d+)")
#: What the versions key may be, as error messages say it.
VERSIONS_RULE = 'must be "all", "latest:N" (N >= 1) or a list of version numbers'


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
    compilation = check.compilation(raw.get("compile"))
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
        compile=compilation,
    )


def latest(policy: str) -> int | None:
    """The N of a ``latest:N`` versions policy (N >= 1); None for any other string."""
    match = _LATEST.fullmatch(policy)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


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
            count = latest(value)
            if count is not None:
                return f"latest:{count}"
            raise self.error(f"versions {VERSIONS_RULE}, not {_show(value)}")
        if not isinstance(value, list) or not value:
            raise self.error(f"versions {VERSIONS_RULE}, not {_show(value)}")
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

    def compilation(self, value: object) -> Compilation:
        if value is None:
            return Compilation()
        table = self.table("compile", value, _COMPILE_KEYS)
        mode = self.choice("compile.mode", table.get("mode", "default"), COMPILE_MODES)
        on_failure = self.choice(
            "compile.on_failure", table.get("on_failure", "eager"), COMPILE_FAILURES
        )
        grad = table.get("grad", False)
        if not isinstance(grad, bool):
            raise self.wrong("compile.grad", "true or false", grad)
        return Compilation(mode, on_failure, grad)

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
