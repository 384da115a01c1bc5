"""The tensorwire-server command and its settings."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import torch
from support.servers import server_argv, spawn_server

from tensorwire import Client
from tensorwire_server.settings import ACCESS_LOGS, Settings


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


def test_settings_parse_by_type_and_check_choices() -> None:
    env = {
        "TENSORWIRE_METRICS_PORT": "9100",
        "TENSORWIRE_MAX_CONNECTION_AGE": "2.5",
        "TENSORWIRE_INSECURE": "yes",
        "TENSORWIRE_MODEL_CONTROL": "explicit",
        "TENSORWIRE_MODEL_REPO": "/models",
    }
    settings = Settings.from_env(env)
    assert (settings.metrics_port, settings.max_connection_age) == (9100, 2.5)
    assert settings.insecure and settings.model_control == "explicit"
    assert settings.model_repo == "/models"
    for name, raw, kind in (("HEALTH_PORT", "x", "int"), ("INSECURE", "maybe", "bool")):
        with pytest.raises(ValueError, match=f"TENSORWIRE_{name}='{raw}' is not a valid {kind}"):
            Settings.from_env({f"TENSORWIRE_{name}": raw})
    assert ACCESS_LOGS == ("errors", "all", "none")
    for name, bad, message in (
        ("log_format", "xml", "log_format must be text or json, not 'xml'"),
        ("access_log", "some", "access_log must be errors, all or none, not 'some'"),
        ("model_control", "auto", "model_control must be none or explicit, not 'auto'"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            Settings(**{name: bad})
        with pytest.raises(ValueError, match=re.escape(message)):
            Settings.from_env({f"TENSORWIRE_{name.upper()}": bad})


def test_server_command_logs_its_device_serves_and_stops_cleanly() -> None:
    with spawn_server("--device", "auto") as (proc, address, lines):
        assert address.startswith("127.0.0.1:")
        # auto picks the first GPU where torch sees one, else the CPU, and says so.
        picked = "cuda:0" if torch.cuda.is_available() else "cpu"
        assert any(f"device {picked} (" in line for line in lines), lines
        with Client(address, timeout=30) as c:
            assert "mlp" in c.info().models
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_bad_model_option_exits_with_a_message() -> None:
    done = subprocess.run(
        server_argv("--model", "oops"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "NAME=SOURCE" in done.stderr
