"""Dynamic batching, measured: many concurrent clients sending batch-1 requests to
the built-in MLP, against the same server with dynamic batching off, in one run.

    .venv/bin/python benchmarks/batching.py [--clients 32] [--seconds 10] [--device cpu]

Each server runs as its own process; the load comes from one more process driving
``--clients`` concurrent AsyncClient calls. The two configurations alternate
``--rounds`` times and the best round of each is kept. Reported: throughput, p50 and
p99 latency, the ratio of throughputs (target on CPU: >= 2x; on a GPU: >= 5x), the
latency check (p99 with batching <= max queue delay + 3 x the unbatched p50) and the
batch sizes the server saw (its ModelStatistics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

import tensorwire as tw

MODEL = "mlp"


def start_server(device: str, batching: bool) -> tuple[subprocess.Popen[str], str]:
    flags = ["--port", "0", "--device", device, "--log-level", "INFO"]
    if not batching:
        flags.append("--no-dynamic-batching")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire_server", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    address = ""
    for line in proc.stderr:
        if match := re.search(r"listening on (\S+)", line):
            address = match.group(1)
        if "server serving" in line:
            # The access log keeps coming: read it, or the server blocks on the pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, address
    raise RuntimeError("the server did not start")


def drive(address: str, clients: int, seconds: float, out: Any) -> None:
    """In its own process: ``clients`` concurrent callers, batch-1 requests."""

    async def main() -> dict[str, float]:
        x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
        async with tw.AsyncClient(address, timeout=60) as client:
            for _ in range(200):  # warm-up
                await client.infer(MODEL, x)
            latencies: list[float] = []
            end = time.perf_counter() + seconds

            async def caller() -> None:
                while time.perf_counter() < end:
                    began = time.perf_counter()
                    await client.infer(MODEL, x)
                    latencies.append(time.perf_counter() - began)

            began = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(clients)))
            elapsed = time.perf_counter() - began
        latencies.sort()
        return {
            "throughput": len(latencies) / elapsed,
            "p50": latencies[len(latencies) // 2],
            "p99": latencies[int(len(latencies) * 0.99)],
        }

    out.send(asyncio.run(main()))


def measure(device: str, batching: bool, clients: int, seconds: float) -> dict[str, Any]:
    proc, address = start_server(device, batching)
    try:
        parent, child = mp.get_context("spawn").Pipe()
        driver = mp.get_context("spawn").Process(
            target=drive, args=(address, clients, seconds, child)
        )
        driver.start()
        result: dict[str, Any] = parent.recv()
        driver.join()
        with tw.Client(address, timeout=30) as client:
            stats = client.model_statistics(MODEL)[0]
            model = client.info().models[MODEL]
        result["batch_sizes"] = stats.batch_sizes
        result["executions"] = stats.executions
        result["requests"] = stats.requests
        batching_info = model.dynamic_batching
        result["max_queue_delay"] = batching_info.max_queue_delay if batching_info else 0.0
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    best: dict[bool, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for batching in (False, True):
            result = measure(args.device, batching, args.clients, args.seconds)
            if batching not in best or result["throughput"] > best[batching]["throughput"]:
                best[batching] = result
    on, off = best[True], best[False]
    ratio = on["throughput"] / off["throughput"]
    bound = on["max_queue_delay"] + 3 * off["p50"]
    mean_batch = on["requests"] / max(on["executions"], 1)
    print(f"# dynamic batching: {args.clients} clients, batch-1 requests to {MODEL!r}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, device {args.device}")
    print("| configuration | requests/s | p50 ms | p99 ms | requests per forward |")
    print("|---|---:|---:|---:|---:|")
    for label, r in (("batching off", off), ("batching on", on)):
        per = r["requests"] / max(r["executions"], 1)
        print(
            f"| {label} | {r['throughput']:.0f} | {r['p50'] * 1e3:.1f} | "
            f"{r['p99'] * 1e3:.1f} | {per:.2f} |"
        )
    print(f"throughput ratio on/off: {ratio:.2f}x (target >= 2x on CPU, >= 5x on a GPU)")
    print(
        f"p99 with batching {on['p99'] * 1e3:.1f} ms vs bound {bound * 1e3:.1f} ms "
        f"(max queue delay + 3 x unbatched p50): {'met' if on['p99'] <= bound else 'NOT met'}"
    )
    print(f"mean requests per forward with batching: {mean_batch:.2f}")
    print(f"batch sizes (rows: forward passes): {on['batch_sizes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"on": on, "off": off, "ratio": ratio}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
