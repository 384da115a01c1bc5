"""Dynamic batching, measured: many concurrent clients sending batch-1 requests to
the built-in MLP, against the same server with dynamic batching off, in one run.

    .venv/bin/python benchmarks/batching.py [--clients 32] [--seconds 10] [--device cpu]
        [--model NAME] [--model-repo DIR]

Each server runs as its own process; the load comes from one more process driving
``--clients`` concurrent AsyncClient calls. The configurations alternate ``--rounds``
times and the best round of each is kept. Reported: throughput, p50 and p99 latency,
the ratio of throughputs (target on CPU: >= 2x; on a GPU: >= 5x), the latency check
(p99 with batching <= max queue delay + 3 x the unbatched p50) and the batch sizes the
server saw (its ModelStatistics).

A third configuration sends the same requests to the built-in ``identity`` model,
which runs no forward pass at all: its throughput is the most any batching of the
model can reach on this machine (batching can save a model's cost per request, never
the RPC's), so ``identity / unbatched`` bounds the ratio. ``--model`` and
``--model-repo`` measure a model of your own (its first input, batch-1 rows of
random data, must batch along its first dimension); ``--wide H`` writes a repository
holding a TorchScript 16-H-H-4 tanh MLP with batching like the built-in one's, and
measures that, to see how much compute a request must carry for batching to pay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import tensorwire as tw

CEILING = "identity"  # no forward pass: what is left is the RPC's cost


def start_server(
    device: str, batching: bool, model_repo: str | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """A tensorwire server process (``env`` added to this one's environment) and its
    address, once it serves."""
    flags = ["--port", "0", "--device", device, "--log-level", "INFO"]
    if not batching:
        flags.append("--no-dynamic-batching")
    if model_repo:
        flags += ["--model-repo", model_repo]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire_server", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
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


def drive(
    address: str,
    model: str,
    row: tuple[tuple[int, ...], str],
    clients: int,
    seconds: float,
    out: Any,
) -> None:
    """In its own process: ``clients`` concurrent callers, batch-1 requests."""

    async def main() -> dict[str, float]:
        shape, dtype = row
        x = np.random.default_rng(0).standard_normal((1, *shape)).astype(dtype)
        async with tw.AsyncClient(address, timeout=60) as client:
            for _ in range(200):  # warm-up
                await client.infer(model, x)
            latencies: list[float] = []
            end = time.perf_counter() + seconds

            async def caller() -> None:
                while time.perf_counter() < end:
                    began = time.perf_counter()
                    await client.infer(model, x)
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


def measure(args: argparse.Namespace, model: str, batching: bool) -> dict[str, Any]:
    """``model`` served with or without batching, sent rows of ``args.model``'s input."""
    proc, address = start_server(args.device, batching, args.model_repo)
    try:
        with tw.Client(address, timeout=30) as client:
            row = row_of(client.info().models[args.model])
        parent, child = mp.get_context("spawn").Pipe()
        driver = mp.get_context("spawn").Process(
            target=drive, args=(address, model, row, args.clients, args.seconds, child)
        )
        driver.start()
        result: dict[str, Any] = parent.recv()
        driver.join()
        with tw.Client(address, timeout=30) as client:
            stats = client.model_statistics(model)[0]
            info = client.info().models[model]
        result["batch_sizes"] = stats.batch_sizes
        result["executions"] = stats.executions
        result["requests"] = stats.requests
        batching_info = info.dynamic_batching
        result["max_queue_delay"] = batching_info.max_queue_delay if batching_info else 0.0
        result["configured"] = batching_info is not None
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def wide_repo(hidden: int, folder: str) -> str:
    """A repository with one model, ``mlp_wide``: the built-in MLP's shape and batching,
    hidden layers ``hidden`` wide, as TorchScript. Its name."""
    import torch  # only here: the rest of the benchmark needs no torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4)
    )
    version = Path(folder, "mlp_wide", "1")
    version.mkdir(parents=True)
    torch.jit.script(mlp.eval()).save(str(version / "model.pt"))
    (version.parent / "model.toml").write_text(
        "max_batch_size = 64\n[dynamic_batching]\nmax_queue_delay_ms = 0\n"
        '[[inputs]]\nname = "input"\ndtype = "float32"\nshape = [-1, 16]\n'
        '[[outputs]]\nname = "output"\ndtype = "float32"\nshape = [-1, 4]\n'
    )
    return "mlp_wide"


def row_of(model: Any) -> tuple[tuple[int, ...], str]:
    """One row of ``model``'s first input (its ModelInfo): the shape past the batch
    dimension, and the dtype."""
    spec = model.inputs[0]
    if spec.shape is None or any(d < 0 for d in spec.shape[1:]):
        raise SystemExit(f"{model.name}: its first input needs a fixed shape past the batch")
    return tuple(spec.shape[1:]), spec.dtype or "float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="mlp", help="the model to load (default mlp)")
    parser.add_argument("--model-repo", help="a model repository the servers also serve")
    parser.add_argument("--wide", type=int, metavar="H", help="measure a 16-H-H-4 MLP")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.wide:
            args.model, args.model_repo = wide_repo(args.wide, folder), folder
        run(args)


def run(args: argparse.Namespace) -> None:
    """Measure, report, and write the JSON asked for."""
    configurations = {
        "off": (args.model, False),
        "on": (args.model, True),
        # identity takes any tensor: the same bytes as the model's requests
        "ceiling": (CEILING, False),
    }
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for key, (model, batching) in configurations.items():
            result = measure(args, model, batching)
            if key not in best or result["throughput"] > best[key]["throughput"]:
                best[key] = result
    on, off, ceiling = best["on"], best["off"], best["ceiling"]
    ratio = on["throughput"] / off["throughput"]
    most = ceiling["throughput"] / off["throughput"]
    bound = on["max_queue_delay"] + 3 * off["p50"]
    mean_batch = on["requests"] / max(on["executions"], 1)
    print(f"# dynamic batching: {args.clients} clients, batch-1 requests to {args.model!r}")
    if not on["configured"]:
        print(f"note: {args.model!r} has no [dynamic_batching]: 'on' runs it unbatched too")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, device {args.device}")
    print("| configuration | requests/s | p50 ms | p99 ms | requests per forward |")
    print("|---|---:|---:|---:|---:|")
    rows = (("batching off", off), ("batching on", on), (f"no model ({CEILING})", ceiling))
    for label, r in rows:
        per = r["requests"] / max(r["executions"], 1)
        print(
            f"| {label} | {r['throughput']:.0f} | {r['p50'] * 1e3:.1f} | "
            f"{r['p99'] * 1e3:.1f} | {per:.2f} |"
        )
    print(f"throughput ratio on/off: {ratio:.2f}x (target >= 2x on CPU, >= 5x on a GPU)")
    print(f"most any batching could reach here (no model / off): {most:.2f}x")
    print(
        f"p99 with batching {on['p99'] * 1e3:.1f} ms vs bound {bound * 1e3:.1f} ms "
        f"(max queue delay + 3 x unbatched p50): {'met' if on['p99'] <= bound else 'NOT met'}"
    )
    print(f"mean requests per forward with batching: {mean_batch:.2f}")
    print(f"batch sizes (rows: forward passes): {on['batch_sizes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"on": on, "off": off, "ceiling": ceiling, "ratio": ratio, "most": most},
                f,
                indent=2,
                default=str,
            )


if __name__ == "__main__":
    main()
