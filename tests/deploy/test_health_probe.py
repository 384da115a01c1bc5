"""The health probe and the health port the image, compose and the manifests rely on:
a plain-text gRPC health service beside a TLS-only server, and the probe command that
finds it from the server's own environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.deploy_files import run
from support.servers import server_argv

from tensorwire import Client, UnimplementedError
from tensorwire._transport.methods import SERVICE
from tensorwire_server import probe
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

# ---------------------------------------------------------------------- health


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    cert = trustme.CA().issue_cert("127.0.0.1")
    (tmp_path / "server.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    return str(tmp_path / "server.pem"), str(tmp_path / "server.key")


@pytest.fixture
def tls_server(tls_files: tuple[str, str]) -> Iterator[TensorwireServer]:
    """A TLS-only server with a plain-text health port, not yet serving (STARTING)."""
    cert, key = tls_files
    settings = Settings(port=0, health_port=0, device="cpu", tls_cert=cert, tls_key=key)
    server = TensorwireServer(settings)
    server.start()
    yield server
    server.kill()


def test_the_health_port_answers_check_in_plain_text_and_nothing_else(
    tls_server: TensorwireServer,
) -> None:
    target = f"127.0.0.1:{tls_server.health_port}"
    assert tls_server.health_port not in (None, tls_server.port)
    assert probe.main(["--target", target]) == 1  # starting: NOT_SERVING
    tls_server.ready(build_engine(tls_server.settings))
    assert probe.main(["--target", target]) == 0
    assert probe.main(["--target", target, "--service", SERVICE.full_name]) == 0
    assert probe.main(["--target", target, "--service", "no.such.Service"]) == 1
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(watch))
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with Client(target, timeout=5, retries=0) as client, pytest.raises(UnimplementedError):
        client.info()  # TensorService is on the TLS port only
    tls_server.stop(grace=1.0)
    assert probe.main(["--target", target, "--timeout", "1"]) == 1  # gone


def test_the_probe_finds_the_server_its_environment_configures(
    tls_server: TensorwireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls_server.ready(build_engine(tls_server.settings))
    environ = {
        "TENSORWIRE_HOST": "0.0.0.0",
        "TENSORWIRE_HEALTH_PORT": str(tls_server.health_port),
        "TENSORWIRE_TLS_CERT": str(tls_server.settings.tls_cert),
    }
    # The image's HEALTHCHECK command, as the container runs it.
    done = subprocess.run(
        [sys.executable, "-m", "tensorwire_server.probe"],
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"127.0.0.1:{tls_server.health_port}: SERVING"
    # Without a health port, a TLS-only server cannot be probed in plain text: said so.
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TENSORWIRE_HEALTH_PORT")
    assert probe.main([]) == 2


def test_where_the_probe_looks() -> None:
    assert probe.local_target(Settings(host="0.0.0.0", port=1)) == "127.0.0.1:1"
    assert probe.local_target(Settings(host="::", port=1, health_port=2)) == "[::1]:2"
    assert probe.local_target(Settings(host="10.1.2.3", port=1, health_port=2)) == "10.1.2.3:2"
    assert probe.local_target(Settings(host="fd00::1", port=1)) == "[fd00::1]:1"
    with pytest.raises(ValueError, match="TENSORWIRE_HEALTH_PORT"):
        probe.local_target(Settings(port=1, tls_cert="c.pem", tls_key="k.pem"))


def test_health_port_and_connection_age_are_settings_and_flags() -> None:
    settings = Settings.from_env(
        {"TENSORWIRE_HEALTH_PORT": "50052", "TENSORWIRE_MAX_CONNECTION_AGE": "300"}
    )
    assert settings.health_port == 50052 and settings.max_connection_age == 300.0
    with pytest.raises(ValueError, match="max_connection_age"):
        Settings(max_connection_age=0)
    done = run(*server_argv("--help"))
    assert "--health-port" in done.stdout and "--max-connection-age" in done.stdout
