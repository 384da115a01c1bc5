"""Shared fixtures: real servers on 127.0.0.1:0 and clients talking real gRPC to them.

In an environment with the client alone (no torch, no server: scripts/test-matrix), the
tests that need neither run, against servers started from $TENSORWIRE_TEST_SERVER_PYTHON
(support/client_only.py); the others are not collected."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import client_only, fast_lane

from tensorwire import Client

if not client_only.ACTIVE:
    import torch

    from tensorwire_server.engine.engine import Engine
    from tensorwire_server.server import TensorwireServer, create_server
    from tensorwire_server.settings import Settings

# Test-only models, served by factory (tests/ is on sys.path under pytest).
TOY_MODELS = {
    "quadratic": "support.toy_models:quadratic",
    "two_heads": "support.toy_models:two_heads",
    "rows": "support.toy_models:rows",
    "raises": "support.toy_models:raises",
    "hog": "support.toy_models:hog",
    "sleeper": "support.toy_models:sleeper",
}


#: The device the suite's servers run on: ``pytest --device cuda`` runs every server
#: the fixtures start (``address``, ``start``, ``engine_server``) on the GPU; the
#: tests that need the CPU itself (its memory limits, say) start their own.
DEVICE = "cpu"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="the device the suite's servers run on: cpu (default), cuda or cuda:N",
    )
    fast_lane.add_option(parser)


def pytest_configure(config: pytest.Config) -> None:
    global DEVICE
    DEVICE = config.getoption("--device")
    fast_lane.configure(config)


def on_device(settings: Settings) -> Settings:
    """``settings`` on the suite's device (``--device``) where they name the CPU."""
    if DEVICE != "cpu" and settings.device == "cpu":
        return replace(settings, device=DEVICE)
    return settings


def engine_server(engine: Engine, **settings: Any) -> Iterator[TensorwireServer]:
    """A server on ``engine``'s device with ``settings`` on a free loopback port around
    ``engine`` (built once per module: its models load once); stopped after."""
    server = TensorwireServer(Settings(port=0, device=str(engine.device), **settings), engine)
    server.start()
    try:
        yield server
    finally:
        server.stop(None)


def server_address(server: TensorwireServer) -> str:
    """Where an ``engine_server`` listens."""
    return f"127.0.0.1:{server.port}"


def start(settings: Settings) -> Iterator[str]:
    """Start a server with ``settings`` (on the suite's device, where they name the
    CPU) on a free loopback port; yield its address."""
    server, port = create_server(on_device(settings))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="session")
def address() -> Iterator[str]:
    """A server with the built-in models and the toy models, on the suite's device."""
    if client_only.ACTIVE:
        yield from client_only.served(TOY_MODELS)
        return
    yield from start(Settings(host="127.0.0.1", port=0, device="cpu", models=TOY_MODELS))


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    """A client of the session's server."""
    with Client(address, timeout=60) as c:
        yield c


#: Remote NumPy arrays reproduce NumPy 2's semantics (NEP 50) and need NumPy 2: under
#: NumPy 1 (the client's lowest versions, scripts/test-matrix) their tests are not
#: collected, and tests/client/test_arrays_numpy_version.py checks that importing them
#: says why.
NUMPY_1 = int(np.__version__.split(".")[0]) < 2


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if (
        NUMPY_1
        and collection_path.name.startswith("test_arrays_")
        and (collection_path.parent.name == "arrays")
    ):
        return True
    return client_only.ignored(collection_path) or None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not client_only.ACTIVE and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
