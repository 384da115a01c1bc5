"""The means of measuring that benchmarks/run.py's rows share: sizes as given and
shown, best-of timing, interleaved latencies, peak RSS, payloads, and the processes
measured (a spawned party, the tensorwire server)."""

from __future__ import annotations

import multiprocessing as mp
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1].upper()]) if text[-1].isalpha() else int(text)


def human(n: float) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def start_process(target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def start_tensorwire() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorwire_server",
            "--port",
            "0",
            "--device",
            "auto",
            "--allow-shared-memory",  # for the same-host row (tritonclient)
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"listening on (\S+)", line):
            return proc, m.group(1)
    raise RuntimeError("tensorwire server did not start")


def reset_peak_rss(pid: int | str) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int | str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def make_payload(size: int) -> np.ndarray:
    """``size`` bytes of a random 1 MiB block repeated: not compressible, fast to make."""
    block = np.frombuffer(np.random.default_rng(0).bytes(min(size, 1 << 20)), np.uint8)
    return np.resize(block, size)


def interleaved_latencies(
    calls: int, ours: Callable[[], object], floor: Callable[[], object]
) -> dict[str, float]:
    """p50/p99 of both, sampled alternately so that drift on a shared machine hits both."""
    for _ in range(200):
        ours()
        floor()
    a: list[float] = []
    b: list[float] = []
    for _ in range(calls):
        for fn, samples in ((ours, a), (floor, b)):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    qa, qb = statistics.quantiles(a, n=100), statistics.quantiles(b, n=100)
    return {
        "tensorwire_p50": qa[49] * 1e6,
        "tensorwire_p99": qa[98] * 1e6,
        "echo_p50": qb[49] * 1e6,
        "echo_p99": qb[98] * 1e6,
    }
