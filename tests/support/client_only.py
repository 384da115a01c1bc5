"""The suite in an environment with the client alone (scripts/test-matrix): no torch and
no server in this process. Servers then run as processes of
$TENSORWIRE_TEST_SERVER_PYTHON (an interpreter with the server installed, e.g. the
development .venv's), and test modules that need torch or the server in this process
are not collected. Elsewhere nothing here changes anything."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from support.servers import spawn_server

#: True where torch cannot be imported: the client-only run.
ACTIVE = importlib.util.find_spec("torch") is None

TESTS = Path(__file__).resolve().parents[1]

# Module-level imports that need torch or the server in this process: directly, through
# conftest's in-process servers, or through a support module that imports them.
_DIRECT = re.compile(
    r"^(import torch|from torch\b|import tensorwire_server|from tensorwire_server\b"
    r"|from conftest import)",
    re.MULTILINE,
)
_SUPPORT_NEEDING_SERVER = sorted(
    ".".join(path.relative_to(TESTS).with_suffix("").parts)
    for path in (TESTS / "support").rglob("*.py")
    if _DIRECT.search(path.read_text())
)
_THROUGH_SUPPORT = re.compile(
    r"^(from|import) ("
    + "|".join(re.escape(name.removesuffix(".__init__")) for name in _SUPPORT_NEEDING_SERVER)
    + r")\b",
    re.MULTILINE,
)
# Checks of the repository, not of the client: the layout, the stubs' generator, the
# deploy files, the distributions' builds and the coexistence check (which makes its
# own environment) run in the development environment.
_REPOSITORY_CHECKS = {
    "test_layout.py",
    "test_proto_drift.py",
    "test_distributions.py",
    "test_coexistence.py",
    "deploy",
}


def ignored(path: Path) -> bool:
    """Whether the client-only run leaves ``path`` (a file or a folder) uncollected."""
    if not ACTIVE:
        return False
    if path.name in _REPOSITORY_CHECKS:
        return True
    if path.suffix != ".py" or not path.name.startswith("test_"):
        return False
    text = path.read_text()
    return bool(_DIRECT.search(text) or _THROUGH_SUPPORT.search(text))


def served(models: Mapping[str, str]) -> Iterator[str]:
    """The session's server, as a process of $TENSORWIRE_TEST_SERVER_PYTHON: a CPU
    server with the built-in models and ``models``; yields its address."""
    if not os.environ.get("TENSORWIRE_TEST_SERVER_PYTHON"):
        raise RuntimeError(
            "torch is not installed here: set TENSORWIRE_TEST_SERVER_PYTHON to a Python "
            "with tensorwire-server (scripts/test-matrix does)"
        )
    flags = ["--device", "cpu"]
    for name, factory in models.items():
        flags += ["--model", f"{name}={factory}"]
    with spawn_server(*flags) as (_, address, _):
        yield address
