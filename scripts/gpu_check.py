"""What scripts/gpu-check runs: every GPU check of the project in one go, within a
time budget, on a lent GPU machine (docs/gpu.md).

    gpu_check.py [--dry-run] [--out DIR] [--wheels DIR] [--budget SECONDS]
        Steps, each with its own timeout, all within --budget (420 s): the machine
        (python, torch, CUDA, the GPUs; refused when torch is a CPU build), the
        project put on the path without a package index (carried wheels installed
        into a folder of their own, never over the preinstalled torch), the
        cuda-marked tests, the defect probes (tests/deploy/test_cuda_defects.py),
        the GPU benchmark rows (every byte checked), then the rest of the suite
        against a CUDA server (pytest --device cuda) for the time left. Writes
        gpu-check.json (the summary), gpu-check.log (every step's output),
        junit.xml (every pytest step's) and bench.json to --out ($OUT, else
        gpu-check-out/) and prints a table of the steps.
        --dry-run: the same steps on this machine's CPU: the CUDA steps only collect
        their tests and report skipped, the suite step runs a small fast subset.
    gpu_check.py --prepare-wheels [DIR]
        Here, with a package index: download the wheels the device machine lacks
        (Python 3.12, manylinux x86-64, no torch) into DIR (.whl), to carry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Wheels the device image may lack or hold too old (the generated stubs check grpcio's
#: and protobuf's versions at import); never torch, CUDA's or Triton's.
CARRIED = (
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "trustme",
    "cryptography",  # trustme's, with its own two below
    "cffi",
    "pycparser",
    "tritonclient",
    "python-rapidjson",
)
FORBIDDEN = re.compile(r"^(torch|nvidia|triton)[-_]", re.IGNORECASE)
#: What the project imports at all (the install step checks each).
NEEDED = (
    "numpy",
    "grpc",
    "google.protobuf",
    "ml_dtypes",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "prometheus_client",
    "safetensors",
    "pytest",
    "tensorwire",
    "tensorwire_server.server",
)
#: What some of the suite's tests import: missing, those tests fail, the run goes on.
OPTIONAL = ("trustme", "tritonclient.grpc", "hypothesis")
PROBES = "tests/deploy/test_cuda_defects.py"
#: The dry run's suite: small and fast, but through a server, the hook and staging.
DRY_SUITE = (
    "tests/engine/test_device_faults.py",
    "tests/device/test_staging_order.py",
    "tests/regions/test_cuda_region_close.py",
    "tests/engine/test_infer.py",
)
#: The suite on a GPU, in this order while time lasts: the paths a device changes first.
SUITE_ORDER = (
    "tests/engine",
    "tests/models",
    "tests/core",
    "tests/v1",
    "tests/regions",
    "tests/kserve",
    "tests/device",
    "tests/client",
    "tests/dataport",
    "tests/transport",
    "tests/deploy",
)
#: Not on the device machine: this script's own dry run, and the container and
#: cluster linters (their tools are not installed there; nothing of them is a GPU's).
SUITE_IGNORED = (
    "tests/deploy/test_gpu_check.py",
    "tests/deploy/test_dockerfile_and_compose.py",
    "tests/deploy/test_kubernetes.py",
)
#: Each step's own limit in seconds (the suite gets what is left).
LIMITS = {"machine": 30, "install": 90, "cuda tests": 150, "probes": 120, "benchmark": 90}


@dataclass
class Step:
    """One step's outcome, as the summary reports it."""

    name: str
    status: str = "not run"  # passed, failed, skipped, timeout, refused, not run
    seconds: float = 0.0
    detail: str = ""
    tests: dict[str, int] = field(default_factory=dict)


class Check:
    """The run: its output folder, its clock and its steps."""

    def __init__(self, out: Path, budget: float, dry_run: bool) -> None:
        self.out = out
        self.dry_run = dry_run
        self.deadline = time.monotonic() + budget
        self.steps: list[Step] = []
        self.env = dict(os.environ)
        self.log = (out / "gpu-check.log").open("w")
        self.junit = ET.Element("testsuites")
        self.machine: dict[str, object] = {}
        self._began = time.monotonic()

    def left(self, limit: float) -> float:
        """Seconds the next step may take: its own limit, within the budget."""
        return max(0.0, min(limit, self.deadline - time.monotonic() - 5))

    def run(self, step: Step, argv: list[str], limit: float) -> subprocess.CompletedProcess[str]:
        """Run one command of ``step`` with a timeout, its output into the log."""
        timeout = self.left(limit)
        self.log.write(f"\n===== {step.name}: {' '.join(argv)} (timeout {timeout:.0f} s)\n")
        self.log.flush()
        if timeout < 1:
            return subprocess.CompletedProcess(argv, 124, "", "no time left in the budget")
        try:
            done = subprocess.run(
                argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            text = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
            self.log.write(text + f"\n===== {step.name}: timed out after {timeout:.0f} s\n")
            return subprocess.CompletedProcess(argv, 124, text, "")
        self.log.write(done.stdout + done.stderr)
        self.log.flush()
        return done

    def pytest(self, step: Step, args: list[str], limit: float) -> None:
        """A pytest step: JUnit into the one junit.xml, counts into the step."""
        xml = self.out / f".{step.name.replace(' ', '-')}.xml"
        timeout = ["--timeout", "120"] if _has("pytest_timeout", self.env) else []
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *timeout]
        done = self.run(step, [*argv, f"--junitxml={xml}", *args], limit)
        if xml.exists():
            suites = ET.parse(xml).getroot()
            for suite in suites.iter("testsuite"):
                suite.set("name", step.name)
                self.junit.append(suite)
                for key in ("tests", "failures", "errors", "skipped"):
                    step.tests[key] = step.tests.get(key, 0) + int(suite.get(key, 0))
            xml.unlink()
        step.tests["passed"] = step.tests.get("tests", 0) - sum(
            step.tests.get(k, 0) for k in ("failures", "errors", "skipped")
        )
        last = (done.stdout.strip().splitlines() or [""])[-1]
        if done.returncode == 124:
            status, last = "timeout", f"stopped at its limit; last: {last}"
        elif done.returncode in (0, 5) and not step.tests.get("failures"):
            status = "passed"
        else:
            status = "failed"
        if _RANK[status] >= _RANK[step.status]:  # a step of several runs: the worst
            step.status, step.detail = status, last

    def step(self, name: str) -> Step:
        """A new step; the one before it ends now."""
        self._stop()
        step = Step(name)
        self.steps.append(step)
        self._began = time.monotonic()
        return step

    def _stop(self) -> None:
        if self.steps and not self.steps[-1].seconds:
            self.steps[-1].seconds = time.monotonic() - self._began

    def finish(self) -> bool:
        self._stop()
        ok = all(s.status in ("passed", "skipped") for s in self.steps)
        ET.ElementTree(self.junit).write(self.out / "junit.xml", encoding="unicode")
        summary = {
            "ok": ok,
            "dry_run": self.dry_run,
            "machine": self.machine,
            "steps": [asdict(s) for s in self.steps],
        }
        (self.out / "gpu-check.json").write_text(json.dumps(summary, indent=1))
        self.log.close()
        print(table(self.steps))
        print(f"{'OK' if ok else 'FAILED'}; files in {self.out}")
        return ok


_RANK = {"not run": 0, "skipped": 1, "passed": 1, "timeout": 2, "failed": 3}


def _has(module: str, env: dict[str, str]) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT).returncode == 0


def table(steps: list[Step]) -> str:
    """The steps as a fixed-width table."""
    rows = [("step", "status", "seconds", "tests p/f/e/s", "detail")]
    for s in steps:
        keys = ("passed", "failures", "errors", "skipped")
        counts = "/".join(str(s.tests.get(k, 0)) for k in keys) if s.tests else "-"
        rows.append((s.name, s.status, f"{s.seconds:.1f}", counts, s.detail[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4] for r in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def machine(check: Check) -> bool:
    """The interpreter, torch and the GPUs; False (refused) for a CPU torch on a real run."""
    step = check.step("machine")
    code = (
        "import json, sys, torch; c = torch.cuda.is_available(); print(json.dumps({"
        "'python': sys.version.split()[0], 'torch': torch.__version__,"
        " 'torch_file': torch.__file__, 'cuda': torch.version.cuda, 'available': c,"
        " 'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]"
        " if c else []}))"
    )
    done = check.run(step, [sys.executable, "-c", code], LIMITS["machine"])
    if done.returncode != 0:
        step.status, step.detail = "failed", "python or torch cannot start: see the log"
        return False
    check.machine = json.loads(done.stdout.strip().splitlines()[-1])
    torch_version = str(check.machine["torch"])
    gpus = check.machine["gpus"]
    step.detail = f"torch {torch_version}, CUDA {check.machine['cuda']}, GPUs {gpus or 'none'}"
    if not check.dry_run and ("+cpu" in torch_version or not check.machine["available"]):
        step.status = "refused"
        step.detail = f"torch {torch_version} sees no CUDA GPU: nothing to check (--dry-run?)"
        return False
    step.status = "passed"
    return True


def install(check: Check, wheels: Path | None) -> bool:
    """Carried wheels into a folder of their own (no index, no dependencies, never
    torch), the project's sources on the path; then every import the project needs."""
    step = check.step("install")
    site = check.out / ".site"
    paths = [str(ROOT / "client"), str(ROOT / "server")]
    found = sorted(wheels.glob("*.whl")) if wheels is not None and wheels.is_dir() else []
    refused = [w.name for w in found if FORBIDDEN.match(w.name)]
    if refused:
        step.status, step.detail = "refused", f"will not install over torch: {refused}"
        return False
    if found:
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
        argv += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
        done = check.run(step, [*argv, *map(str, found)], LIMITS["install"])
        if done.returncode != 0:
            step.status, step.detail = "failed", "pip could not install the carried wheels"
            return False
        paths.append(str(site))
    check.env["PYTHONPATH"] = os.pathsep.join([*paths, check.env.get("PYTHONPATH", "")])
    check.env["PYTHONUNBUFFERED"] = "1"
    code = (
        "import importlib, json, torch; missing = {'needed': [], 'optional': []}\n"
        f"for kind, names in (('needed', {NEEDED!r}), ('optional', {OPTIONAL!r})):\n"
        "    for m in names:\n"
        "        try: importlib.import_module(m)\n"
        "        except Exception as e: missing[kind].append(f'{m}: {e}')\n"
        "print(json.dumps({'missing': missing, 'torch_file': torch.__file__}))"
    )
    done = check.run(step, [sys.executable, "-c", code], LIMITS["install"])
    if done.returncode != 0:
        step.status, step.detail = "failed", "the import check did not run: see the log"
        return False
    found_imports = json.loads(done.stdout.strip().splitlines()[-1])
    if found_imports["torch_file"] != check.machine.get("torch_file"):
        step.status, step.detail = "failed", "a carried wheel shadowed the preinstalled torch"
        return False
    missing = found_imports["missing"]
    if missing["needed"]:
        step.status = "failed"
        step.detail = "missing (carry wheels: --prepare-wheels): " + "; ".join(missing["needed"])
        return False
    step.status, step.detail = "passed", f"{len(found)} wheels carried, sources on the path"
    if missing["optional"]:
        step.detail += "; some tests will fail, missing " + "; ".join(missing["optional"])
    return True


def cuda_steps(check: Check) -> None:
    """The cuda-marked tests, the probes and the benchmark rows (collect-only, and
    skipped, on a dry run)."""
    collect = ["--collect-only"] if check.dry_run else []
    step = check.step("cuda tests")
    check.pytest(step, [*collect, "-m", "cuda", "tests", f"--deselect={PROBES}"], LIMITS[step.name])
    step = check.step("probes")
    check.pytest(step, [*collect, PROBES], LIMITS[step.name])
    step = check.step("benchmark")
    argv = [sys.executable, "benchmarks/gpu_copies.py", "--sizes", "1M,64M,256M"]
    done = check.run(step, argv, LIMITS[step.name])
    lines = done.stdout.strip().splitlines()
    if done.returncode == 124:
        step.status, step.detail = "timeout", "stopped at its limit"
    elif done.returncode != 0 or not lines:
        step.status = "failed"
        step.detail = (done.stderr.strip().splitlines() or ["see the log"])[-1]
    else:
        bench = json.loads(lines[-1])
        (check.out / "bench.json").write_text(json.dumps(bench, indent=1))
        rows = bench["rows"]
        step.status = "passed" if rows else "skipped"
        step.detail = f"{len(rows)} rows, every byte verified" if rows else "no CUDA: no rows"
    if check.dry_run:
        for step in check.steps[-3:-1]:
            if step.status == "passed":
                collected = step.tests.get("tests", 0) or _collected(step.detail)
                step.status, step.detail = "skipped", f"dry run: {collected} tests collected"
                step.tests = {}


def _collected(last: str) -> int:
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", last)
    return int(found.group(1)) if found else 0


def suite(check: Check) -> None:
    """The rest of the suite against a CUDA server, a folder at a time (each with its
    JUnit, whatever happens to the next) for the time left; on a dry run a small
    subset on the CPU."""
    step = check.step("suite")
    if check.dry_run:
        check.pytest(step, ["--device", "cpu", *DRY_SUITE], 120)
        return
    ignored = [f"--ignore={path}" for path in SUITE_IGNORED]
    unreached = []
    for part in SUITE_ORDER:
        if check.left(3600) < 20:
            unreached.append(part)
            continue
        check.pytest(step, ["--device", "cuda", "-m", "not cuda", *ignored, part], 3600)
    if unreached:
        step.status = "timeout" if step.status != "failed" else step.status
        step.detail = f"not reached in the budget: {' '.join(unreached)}; {step.detail}"


def prepare_wheels(folder: Path) -> int:
    """Download the wheels the device machine may lack, at this environment's versions."""
    from importlib.metadata import PackageNotFoundError, version

    folder.mkdir(exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)] + ["manylinux2014_x86_64"]
    wanted = []
    for name in CARRIED:
        try:
            wanted.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            wanted.append(name)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]
    for platform in platforms:
        argv += ["--platform", platform]
    return subprocess.run([*argv, *wanted], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Every GPU check of tensorwire, in one go.")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="output folder ($OUT)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="carried wheels")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds in all")
    parser.add_argument("--prepare-wheels", nargs="?", const=ROOT / ".whl", type=Path)
    args = parser.parse_args(argv)
    if args.prepare_wheels is not None:
        return prepare_wheels(args.prepare_wheels)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget, args.dry_run)
    if machine(check) and install(check, args.wheels):
        cuda_steps(check)
        suite(check)
    shutil.rmtree(out / ".site", ignore_errors=True)
    if not check.finish():
        return 2 if any(s.status == "refused" for s in check.steps) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
