"""Which method of the v2 protocol each REST URL asks for: its name (as
inference.GRPCInferenceService names it, whose scopes it needs) and the model,
version or region the URL names."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

#: The gRPC service whose methods' scopes the REST endpoints share (security.METHOD_SCOPES).
SERVICE_PATH: Final = "/inference.GRPCInferenceService/"
#: How the REST calls are named in metrics and the access log: REST/<method>.
LABEL: Final = "REST/"


@dataclass(frozen=True)
class Route:
    """One REST call: the v2 method it is, what its URL names, and the HTTP method
    the URL is served with."""

    method: str
    verb: str
    model: str = ""
    version: str = ""
    region: str = ""

    @property
    def grpc_method(self) -> str:
        """The full gRPC path of the same method (for its scope)."""
        return SERVICE_PATH + self.method

    @property
    def label(self) -> str:
        """The call's name in metrics and the access log."""
        return LABEL + self.method


_HEALTH: Final = {"live": "ServerLive", "ready": "ServerReady"}
# /v2/models/{m}[/versions/{v}]/<what>
_MODEL: Final = {
    "": ("ModelMetadata", "GET"),
    "ready": ("ModelReady", "GET"),
    "infer": ("ModelInfer", "POST"),
    "config": ("ModelConfig", "GET"),
    "stats": ("ModelStatistics", "GET"),
}
_MEMORY: Final = {
    "systemsharedmemory": "SystemSharedMemory",
    "cudasharedmemory": "CudaSharedMemory",
}
_MEMORY_VERBS: Final = {"status": "GET", "register": "POST", "unregister": "POST"}


@functools.lru_cache(maxsize=256)  # a server's few paths, each parsed once
def route(path: str) -> Route | None:
    """The call ``path`` asks for; None for a URL the protocol does not have."""
    parts = [unquote(p) for p in path.split("/")]
    if len(parts) < 2 or parts[0] != "" or parts[1] != "v2":
        return None
    rest = parts[2:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # /v2/ as /v2
    if not rest:
        return Route("ServerMetadata", "GET")
    head = rest[0]
    if head == "health" and len(rest) == 2 and rest[1] in _HEALTH:
        return Route(_HEALTH[rest[1]], "GET")
    if head == "models":
        return _model(rest[1:])
    if head == "repository":
        return _repository(rest[1:])
    if head in _MEMORY:
        return _memory(_MEMORY[head], rest[1:])
    return None


def _model(rest: list[str]) -> Route | None:
    if rest == ["stats"]:
        return Route("ModelStatistics", "GET")  # every model's
    if not rest or not rest[0]:
        return None
    model, rest = rest[0], rest[1:]
    version = ""
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    if len(rest) > 1:
        return None
    found = _MODEL.get(rest[0] if rest else "")
    if found is None:
        return None
    return Route(found[0], found[1], model=model, version=version)


def _repository(rest: list[str]) -> Route | None:
    if rest == ["index"]:
        return Route("RepositoryIndex", "POST")
    if len(rest) == 3 and rest[0] == "models" and rest[1] and rest[2] in ("load", "unload"):
        method = "RepositoryModelLoad" if rest[2] == "load" else "RepositoryModelUnload"
        return Route(method, "POST", model=rest[1])
    return None


def _memory(kind: str, rest: list[str]) -> Route | None:
    region = ""
    if len(rest) == 3 and rest[0] == "region" and rest[1]:
        region, rest = rest[1], rest[2:]
    if len(rest) != 1 or rest[0] not in _MEMORY_VERBS:
        return None
    if rest[0] == "register" and not region:
        return None  # a region is registered by name
    return Route(kind + rest[0].capitalize(), _MEMORY_VERBS[rest[0]], region=region)
