"""The client installs beside the newest tritonclient[grpc], tritonclient[http],
mlserver, kserve and ray[serve] without downgrading any, and each client then answers
(scripts/coexistence.py). Needs the package index: where it does not answer, the script
says so and this test skips with its words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.servers import spawn_server

ROOT = Path(__file__).resolve().parents[2]
SKIPPED = 77  # scripts/coexistence.py: the index did not answer


@pytest.mark.timeout(2400)
def test_the_client_downgrades_no_other_inference_client() -> None:
    with spawn_server("--device", "cpu") as (_, address, _):
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "coexistence.py"), "--target", address],
            capture_output=True,
            text=True,
            timeout=2300,
        )
    print(done.stdout)  # the table of versions, in the log of a failing run
    if done.returncode == SKIPPED:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "coexistence: OK" in done.stdout
