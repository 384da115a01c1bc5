"""The server's one settings object: defaults, then TENSORWIRE_* environment, then flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tensorwire.streaming import DEFAULT_CHUNK_SIZE

ENV_PREFIX = "TENSORWIRE_"


@dataclass(frozen=True)
class Settings:
    """How a tensorwire server runs. Each field can be set as TENSORWIRE_<FIELD>."""

    #: Address to listen on; 127.0.0.1 by default so nothing is exposed by accident.
    host: str = "127.0.0.1"
    #: Port to listen on; 0 picks a free one (tests).
    port: int = 50051
    #: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    device: str = "auto"
    #: Extra models, name -> source (a .pt2 file, a TorchScript file or module:factory).
    #: From the environment: TENSORWIRE_MODELS="name=source,name=source".
    models: Mapping[str, str] = field(default_factory=dict)
    #: Serve the built-in models (identity, echo, mlp, mlp64).
    builtins: bool = True
    #: Threads answering requests.
    workers: int = 16
    #: Payload bytes per chunk message of a streamed response.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Logging level name.
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, replaced by TENSORWIRE_* variables, replaced by non-None overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(
                f"chunk_size must be a positive number of bytes, not {self.chunk_size}"
            )


def _parse(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "bool":
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind.startswith("Mapping"):
            pairs = (item.partition("=") for item in raw.split(",") if item.strip())
            return {k.strip(): v.strip() for k, _, v in pairs}
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
