"""The one way tests run a server as a process of its own: ``server_argv`` for the
command line, ``spawn_server`` to start one and wait until it listens or serves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

#: tests/: on a spawned server's PYTHONPATH, so that ``support.toy_models:...`` loads.
TESTS = Path(__file__).resolve().parents[1]

#: Launches an argv with Popen's keyword arguments (e.g. inside a network namespace).
Launch = Callable[..., "subprocess.Popen[str]"]


def server_argv(*flags: str) -> list[str]:
    """``python -m tensorwire_server FLAGS`` with this interpreter, or with
    $TENSORWIRE_TEST_SERVER_PYTHON where set (a client-only run: support/client_only.py)."""
    python = os.environ.get("TENSORWIRE_TEST_SERVER_PYTHON") or sys.executable
    return [python, "-m", "tensorwire_server", *flags]


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment with tests/ on PYTHONPATH, unbuffered output and
    ``extra`` on top."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
    # The command serves REST on 8000 by default: tests' servers take any free port,
    # so that several run at once.
    rest = {"TENSORWIRE_HTTP_PORT": os.environ.get("TENSORWIRE_HTTP_PORT", "0")}
    return {**os.environ, **rest, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def _popen(*argv: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload, no-any-return]


@contextmanager
def spawn_server(
    *flags: str,
    env: Mapping[str, str] | None = None,
    until: str = "serving",
    launch: Launch = _popen,
) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """Run ``tensorwire-server --port 0 FLAGS`` as its own process (for its exit code,
    signals or memory); yield it, its address and its log lines so far once it logs
    that it is ``until`` ("listening": bound, models may still load; "serving": models
    loaded); kill it after. Its later log lines keep arriving in the list."""
    wanted = {"serving": "server serving", "listening": "listening on"}[until]
    proc = launch(
        *server_argv("--port", "0", *flags),
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(**(env or {})),
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
            if wanted in line:
                # Keep reading: a server blocked on a full stderr pipe would hang.
                drain = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
                drain.start()
                yield proc, address, lines
                return
        pytest.fail("server did not start: " + "".join(lines))
    finally:
        proc.kill()
        proc.wait(30)
