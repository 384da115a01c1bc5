"""scripts/gpu-check --dry-run: the GPU machine's one prepared script runs its steps
here on the CPU (the CUDA ones collect their tests and report skipped), so that it
cannot rot between the rare runs on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["machine", "install", "cuda tests", "probes", "benchmark", "suite"]


def test_the_dry_run_takes_every_step_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert summary["ok"] and summary["dry_run"] and list(steps) == STEPS
    assert steps["machine"]["status"] == "passed" and "torch" in steps["machine"]["detail"]
    assert steps["install"]["status"] == "passed"
    # The CUDA steps: skipped on the CPU, but their tests collected (they import).
    for name in ("cuda tests", "probes"):
        assert steps[name]["status"] == "skipped", steps[name]
        collected = int(steps[name]["detail"].split()[2])
        assert collected > 0, steps[name]
    assert steps["benchmark"]["status"] == "skipped"
    assert json.loads((tmp_path / "bench.json").read_text()) == {"verified": False, "rows": {}}
    suite = steps["suite"]
    assert suite["status"] == "passed" and suite["tests"]["passed"] > 0
    assert suite["tests"]["failures"] == suite["tests"]["errors"] == 0
    junit = ET.parse(tmp_path / "junit.xml").getroot()
    assert {s.get("name") for s in junit.iter("testsuite")} >= {"suite"}
    assert "suite" in (tmp_path / "gpu-check.log").read_text()
    # The table, one row a step, and the verdict.
    table = done.stdout.splitlines()
    assert table[0].split()[:2] == ["step", "status"]
    assert [line.split("  ")[0].strip() for line in table[2:8]] == STEPS
    assert table[-1].startswith("OK")


def test_a_real_run_refuses_a_cpu_torch(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return  # this machine could run it for real: nothing to refuse
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("machine", "refused")]
    assert "sees no CUDA GPU" in summary["steps"][0]["detail"]
