"""The tensorwire-server command and its settings."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import spawn_server

from tensorwire import Client
from tensorwire_server.settings import Settings


def test_settings_read_the_environment_then_overrides() -> None:
    env = {
        "TENSORWIRE_PORT": "6000",
        "TENSORWIRE_BUILTINS": "false",
        "TENSORWIRE_MODELS": "a=/m/a.pt2, b=pkg.mod:make",
    }
    settings = Settings.from_env(env, port=7000, device=None)
    assert settings.port == 7000 and settings.device == "auto" and not settings.builtins
    assert settings.models == {"a": "/m/a.pt2", "b": "pkg.mod:make"}
    with pytest.raises(ValueError, match="TENSORWIRE_WORKERS"):
        Settings.from_env({"TENSORWIRE_WORKERS": "many"})


def test_server_command_logs_its_device_serves_and_stops_cleanly() -> None:
    with spawn_server("--device", "auto") as (proc, address, lines):
        assert address.startswith("127.0.0.1:")
        assert any("device cpu" in line for line in lines)  # auto picks the CPU and says so
        with Client(address, timeout=30) as c:
            assert "mlp" in c.info().models
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_bad_model_option_exits_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tensorwire_server", "--model", "oops"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "NAME=SOURCE" in done.stderr
