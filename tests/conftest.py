"""Shared fixtures: real servers on 127.0.0.1:0 and clients talking real gRPC to them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorwire import Client
from tensorwire_server.engine.engine import Engine
from tensorwire_server.server import TensorwireServer, create_server
from tensorwire_server.settings import Settings

TESTS = Path(__file__).parent
# Test-only models, served by factory (tests/ is on sys.path under pytest).
TOY_MODELS = {
    "quadratic": "toy_models:quadratic",
    "two_heads": "toy_models:two_heads",
    "rows": "toy_models:rows",
    "raises": "toy_models:raises",
    "hog": "toy_models:hog",
    "sleeper": "toy_models:sleeper",
}


def engine_server(engine: Engine, **settings: Any) -> Iterator[TensorwireServer]:
    """A CPU server with ``settings`` on a free loopback port around ``engine`` (built
    once per module: its models load once); stopped after."""
    server = TensorwireServer(Settings(port=0, device="cpu", **settings), engine)
    server.start()
    try:
        yield server
    finally:
        server.stop(None)


def server_address(server: TensorwireServer) -> str:
    """Where an ``engine_server`` listens."""
    return f"127.0.0.1:{server.port}"


def start(settings: Settings) -> Iterator[str]:
    """Start a server with ``settings`` on a free loopback port; yield its address."""
    server, port = create_server(settings)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@contextmanager
def spawn_server(*flags: str) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """Run ``tensorwire-server --port 0 FLAGS`` as its own process (for its exit code,
    signals or memory); yield it, its address and its log lines so far once it
    serves; kill it after. Its later log lines keep arriving in the list."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire_server", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        address = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            lines.append(line)
            if match := re.search(r"listening on ([\w.:\[\]-]+)", line):
                address = match.group(1)
            if "server serving" in line:  # models loaded: TensorService answers
                # Keep reading: a server blocked on a full stderr pipe would hang.
                drain = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
                drain.start()
                yield proc, address, lines
                return
        pytest.fail("server did not start: " + "".join(lines))
    finally:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="session")
def address() -> Iterator[str]:
    """A CPU server with the built-in models and the toy models."""
    yield from start(Settings(host="127.0.0.1", port=0, device="cpu", models=TOY_MODELS))


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    """A client of the session's server."""
    with Client(address, timeout=60) as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
