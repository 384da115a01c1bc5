"""Filling the registry: the built-in models, ``--model`` options and the model
repository at start (``load_all``), and repository models loaded or unloaded while
serving (``ModelControl``)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from tensorwire.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, shown
from tensorwire_server.engine.engine import Engine
from tensorwire_server.models.builtins import builtin_config, builtin_models
from tensorwire_server.models.compiled import use_cache_dir
from tensorwire_server.models.config import Compilation, ConfigError, ModelConfig, read_config
from tensorwire_server.models.loader import load_model, load_version
from tensorwire_server.models.model import Model
from tensorwire_server.models.registry import ModelEntry
from tensorwire_server.models.repository import model_names, version_numbers
from tensorwire_server.settings import COMPILE_MODES, Settings

log = logging.getLogger(__name__)


def load_all(engine: Engine, settings: Settings) -> list[str]:
    """Load every model the settings name into ``engine``, at start; return what failed,
    one line each (ValueError instead, with all of them, when the settings are strict)."""
    use_cache_dir(settings.compile_cache_dir)  # before anything compiles
    entries: list[ModelEntry] = []
    if settings.builtins:
        for model in builtin_models().values():
            config = builtin_config(model, settings.dynamic_batching)
            entries.append(engine.registry.serve(config, {1: model}))
    for name, source in settings.models.items():
        try:
            model = load_model(name, source)
            compilation = model_compilation(model, settings)
            config = ModelConfig.of(model, compile=compilation)
            entries.append(engine.registry.serve(config, {1: model}))
        except ValueError as exc:
            entries.append(ModelEntry(ModelConfig(name), failures={0: str(exc)}))
    root = repository_root(settings)
    if root is not None:
        try:
            names = model_names(root)
        except ConfigError as exc:
            raise ValueError(f"model repository: {exc}") from exc
        entries.extend(read_model(engine, root, name, settings.dynamic_batching) for name in names)
    failures = [f"model {e.config.name!r}: {e.reason}" for e in entries if e.failures]
    if failures and settings.strict:
        raise ValueError("models failed to load (strict): " + "; ".join(failures))
    for entry in entries:
        engine.registry.install(entry)
        if entry.failures:
            log.error("model %r did not load: %s", entry.config.name, entry.reason)
    return failures


def model_compilation(model: Model, settings: Settings) -> Compilation:
    """torch.compile for a --model model: its factory's choice, else the settings'
    (which leave compiled artefacts, AOTInductor and TorchScript, as they are); a
    failure fails the model when the settings are strict, else it serves eagerly."""
    mode = model.compile
    if mode is None:
        compilable = model.kind not in ("aotinductor", "torchscript")
        mode = settings.model_compile if compilable else "off"
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"model {model.name!r}: its factory chose compile mode {mode!r}, not one of "
            + ", ".join(COMPILE_MODES)
        )
    return Compilation(mode, on_failure="fail" if settings.strict else "eager")


def repository_root(settings: Settings) -> Path | None:
    """The model repository's folder; None when the server has none."""
    return Path(settings.model_repo) if settings.model_repo else None


def read_model(engine: Engine, root: Path, name: str, dynamic_batching: bool) -> ModelEntry:
    """Load every version of repository model ``name`` (not yet serving); each failure
    is recorded in the entry with its reason."""
    try:
        config = read_config(root / name)
        if not dynamic_batching:
            config = replace(config, batching=None)
        numbers = version_numbers(config)
    except ConfigError as exc:
        return ModelEntry(ModelConfig(name, path=root / name), failures={0: str(exc)})
    versions: dict[int, Model | str] = {}
    for number in numbers:
        try:
            versions[number] = load_version(config, number)
        except ConfigError as exc:
            versions[number] = str(exc)
    return engine.registry.serve(config, versions)


class ModelControl:
    """Loads and unloads repository models in ``engine`` while serving, when the
    settings' model_control is explicit."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.root = repository_root(settings)
        self._lock = threading.Lock()  # one Load or Unload at a time

    @property
    def explicit(self) -> bool:
        """Whether Load and Unload may change the models while serving."""
        return self.settings.model_control == "explicit"

    def load(self, name: str) -> ModelEntry:
        """Load (or reload) repository model ``name`` and serve it in place of what
        served under that name; all of its versions must load, else nothing changes."""
        self._check()
        if self.root is None:
            raise FailedPreconditionError("the server has no model repository (--model-repo)")
        if "/" in name or name in ("", ".", "..") or not (self.root / name).is_dir():
            raise NotFoundError(f"the model repository has no model {shown(name)}")
        with self._lock:
            entry = read_model(self.engine, self.root, name, self.settings.dynamic_batching)
            if entry.failures:
                # What served under the name goes on serving; the new versions go.
                for served in entry.versions.values():
                    served.retire(0)
                raise InvalidArgumentError(f"model {shown(name)} did not load: {entry.reason}")
            self.engine.registry.install(entry, self.settings.shutdown_grace)
        log.info("model %r loaded: versions %s", name, ", ".join(map(str, entry.versions)))
        return entry

    def unload(self, name: str, version: int = 0) -> list[int]:
        """Stop serving ``name`` (or one version) once its requests in flight finish."""
        self._check()
        with self._lock:
            return self.engine.registry.unload(name, version, self.settings.shutdown_grace)

    def _check(self) -> None:
        if not self.explicit:
            raise FailedPreconditionError(
                "models are fixed while serving: start the server with "
                "--model-control explicit to load and unload them"
            )


__all__ = ["ModelControl", "load_all", "read_model", "repository_root"]
