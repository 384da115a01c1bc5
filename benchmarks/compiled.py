"""Compiled models through the server, in one run: the same network served eagerly, by
torch.compile and as an AOTInductor package, and a restart over a warm compile cache.

    .venv/bin/python benchmarks/compiled.py [--features 64] [--hidden 256] [--depth 8]
        [--seconds 3] [--rounds 3] [--device cpu]

examples/make_compiled_repo.py writes the repository: ``mixer_eager`` (a residual MLP
of LayerNorm + GELU blocks, served as it is), ``mixer`` (the same, torch.compile'd in
warm-up) and ``mixer_aoti`` (the same weights as an AOTInductor package), each with
dynamic batching up to 64 rows. Each server is a process of its own. Reported:

- READY times: a server over the eager and AOTInductor models alone (no compiling),
  the same with ``mixer`` over an empty --compile-cache-dir (cold: it compiles) and
  again over the filled one (warm), and the seconds each spent compiling in warm-up
  (its log). Target: warm READY <= 0.3 x the cold compile time.
- batch 64: rows per second of one caller's back-to-back requests, per model, the
  models interleaved round by round (best round kept). Target: the better compiled
  one >= 1.2 x eager.
- batch 1: p50 latency, the models' requests interleaved. Target: not worse than eager.
- 32 concurrent callers of batch-1 requests (dynamic batching stacks them into batches
  of any size): throughput, and the graphs compiled and recompiled (Info's counts)
  before and after. Target: zero recompilations.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from batching import drive

import tensorwire as tw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_compiled_repo import write_repository

MODELS = ("mixer_eager", "mixer", "mixer_aoti")
SERVER = (sys.executable, "-m", "tensorwire_server", "--port", "0", "--no-builtins")


_COMPILED = re.compile(r"compiled \(\S+\) in warm-up in ([\d.]+) s")


def start(root: Path, cache: Path, device: str) -> tuple[subprocess.Popen[str], str, float, float]:
    """A server over ``root``: its process, address, seconds to READY (serving) and
    seconds its warm-up spent compiling (its log says)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        [*SERVER, "--device", device, "--model-repo", str(root), "--compile-cache-dir", str(cache)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    address = ""
    compiling = 0.0
    for line in proc.stderr:
        if match := re.search(r"listening on (\S+)", line):
            address = match.group(1)
        if match := _COMPILED.search(line):
            compiling += float(match.group(1))
        if "server serving" in line:
            ready = time.perf_counter() - began
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, address, ready, compiling
    raise RuntimeError("the server did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(30)


def rows_per_second(client: tw.Client, model: str, x: np.ndarray, seconds: float) -> float:
    calls = 0
    end = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < end:
        client.infer(model, {"input": x})
        calls += 1
    return calls * len(x) / (time.perf_counter() - began)


def p50s(client: tw.Client, x: np.ndarray, calls: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {m: [] for m in MODELS}
    for _ in range(calls):
        for model in MODELS:
            began = time.perf_counter()
            client.infer(model, {"input": x})
            samples[model].append(time.perf_counter() - began)
    return {m: statistics.median(s) * 1e6 for m, s in samples.items()}


def concurrent(address: str, model: str, features: int, seconds: float) -> dict[str, Any]:
    with tw.Client(address, timeout=60) as client:
        before = client.info().models[model]
    parent, child = mp.get_context("spawn").Pipe()
    row = ((features,), "float32")
    driver = mp.get_context("spawn").Process(
        target=drive, args=(address, model, row, 32, seconds, child)
    )
    driver.start()
    result: dict[str, Any] = parent.recv()
    driver.join()
    with tw.Client(address, timeout=60) as client:
        after = client.info().models[model]
        stats = client.model_statistics(model)[0]
    result.update(
        graphs=after.compiled_graphs,
        recompilations=after.recompilations - before.recompilations,
        largest_batch=max(stats.batch_sizes),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tw-compiled-"))
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {mp.cpu_count()} cores"}
    try:
        root = work / "repo"
        began = time.perf_counter()
        write_repository(
            root,
            features=args.features,
            hidden=args.hidden,
            depth=args.depth,
            device="cuda" if args.device.startswith("cuda") else "cpu",
            eager=True,
        )
        report["aoti_package_seconds"] = time.perf_counter() - began
        plain = work / "plain"  # the same without the model torch.compile compiles
        shutil.copytree(root, plain, ignore=lambda d, names: ["mixer"] if d == str(root) else [])
        cache = work / "cache"
        proc, _, ready_plain, _ = start(plain, work / "unused-cache", args.device)
        stop(proc)
        proc, _, ready_cold, compile_cold = start(root, cache, args.device)
        stop(proc)
        proc, address, ready_warm, compile_warm = start(root, cache, args.device)
        report["ready"] = {
            "no_compile": ready_plain,
            "cold": ready_cold,
            "warm": ready_warm,
            "cold_compile": compile_cold,
            "warm_compile": compile_warm,
            "warm_ready_over_cold_compile": ready_warm / compile_cold,
            "warm_over_cold_ready": ready_warm / ready_cold,
            "warm_over_cold_compile": compile_warm / compile_cold,
        }
        rng = np.random.default_rng(0)
        x64 = rng.standard_normal((64, args.features)).astype(np.float32)
        x1 = x64[:1].copy()
        with tw.Client(address, timeout=60) as client:
            for model in MODELS:  # warm-up of the RPC path
                for _ in range(20):
                    client.infer(model, {"input": x64})
            best = {m: 0.0 for m in MODELS}
            for _ in range(args.rounds):
                for model in MODELS:
                    rate = rows_per_second(client, model, x64, args.seconds)
                    best[model] = max(best[model], rate)
            latency = p50s(client, x1, 300)
            report["execution"] = {m: client.info().models[m].execution for m in MODELS}
        report["batch64_rows_per_second"] = best
        report["batch64_speedup"] = {m: best[m] / best["mixer_eager"] for m in MODELS}
        report["batch1_p50_us"] = latency
        report["concurrent32"] = {
            m: concurrent(address, m, args.features, args.seconds) for m in MODELS
        }
        stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
