"""The model repository's folders: the models it holds, the version folders of a model
to serve, and the one model file in a version folder.

A repository is a directory; each model is a sub-folder holding ``model.toml`` and
numbered version folders (``1/``, ``2/``, ...). A version folder holds exactly one of
``model.pt`` (TorchScript), ``model.pt2`` (``torch.export``) or ``model.safetensors``
(weights for the module the config's ``factory`` builds). Model files come from the
operator: nothing here is ever read from a client.
"""

from __future__ import annotations

from pathlib import Path

from tensorwire_server.models.config import (
    CONFIG_FILE,
    VERSIONS_RULE,
    ConfigError,
    ModelConfig,
    latest,
)

#: The files a version folder may hold (exactly one of), and the kind each loads as.
MODEL_FILES = {"model.pt": "torchscript", "model.pt2": "export", "model.safetensors": "safetensors"}


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


def model_folder(config: ModelConfig) -> Path:
    """The model's folder in the repository; ConfigError for a model without one."""
    if config.path is None:
        raise ConfigError(f"model {config.name!r} has no folder (a built-in)")
    return config.path


def version_numbers(config: ModelConfig) -> list[int]:
    """The version folders to serve under the config's policy, newest first;
    ConfigError when there is none."""
    folder = model_folder(config)
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
        count = latest(policy)
        if count is None:
            raise ConfigError(f"{folder / CONFIG_FILE}: versions {VERSIONS_RULE}, not {policy!r}")
        return newest_first[:count]
    missing = [v for v in policy if v not in present]
    if missing:
        raise ConfigError(
            f"{folder / CONFIG_FILE}: versions lists {', '.join(map(str, missing))}, "
            f"but there is no such version folder in {folder}"
        )
    return sorted(set(policy), reverse=True)


def version_file(config: ModelConfig, version: int) -> tuple[Path, str]:
    """The one model file of a version folder and the kind it loads as (a value of
    ``MODEL_FILES``); ConfigError when the folder holds none or several."""
    folder = model_folder(config) / str(version)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such version folder")
    found = [folder / name for name in MODEL_FILES if (folder / name).exists()]
    if not found:
        raise ConfigError(f"{folder}: holds none of {', '.join(MODEL_FILES)}")
    if len(found) > 1:
        names = " and ".join(f.name for f in found)
        raise ConfigError(f"{folder}: holds {names}; a version folder holds exactly one")
    return found[0], MODEL_FILES[found[0].name]
