"""The control plane, measured: what a small call costs against gRPC's own floors, and
whether batching pays, every figure in one run.

    .venv/bin/python benchmarks/control_plane.py [--calls 2000] [--clients 32]
        [--seconds 8] [--wide 2048] [--rounds 2] [--json results.json]

1. Sequential small calls (a [1, 16] float32 array, 64 bytes), p50 and p99, sampled in
   turn so that drift on a shared machine hits all alike: a bare sync grpcio echo of
   the raw bytes, a bare grpc.aio echo, tensorwire's ``identity`` through Client, and
   torch.distributed.rpc forced onto TCP (as between two hosts; timed on its own).
2. ``--clients`` concurrent AsyncClient-style callers for ``--seconds``: requests per
   second, and the server process's CPU time (user + system) per request, against the
   bare grpc.aio echo.
3. A 16-H-H-4 MLP (``--wide H``) from a model repository under the same callers,
   batch-1 requests, with dynamic batching on and off (benchmarks/batching.py).

Targets (issue 17, a 2-core machine like CI's): small-call p50 <= 1.2 x the faster bare
echo and below torch.distributed.rpc's; server CPU per request <= 2 x the aio echo's;
batching >= 2 x without it. Every server is its own process on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import batching
import peers

import tensorwire as tw

SMALL = np.ones((1, 16), np.float32)
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(target: Callable[[Connection], None]) -> tuple[Any, int]:
    """A peer server in its own process, and its port."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child,), daemon=True)
    proc.start()
    return proc, int(parent.recv())


def quantiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6}


def sample(calls: int, parties: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Seconds of each party's calls, taken in turn, after a warm-up."""
    for _ in range(200):
        for fn in parties.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in parties}
    for _ in range(calls):
        for name, fn in parties.items():
            began = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - began)
    return samples


def sequential(calls: int, parties: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each party's calls, taken in turn, after a warm-up."""
    return {name: quantiles(s) for name, s in sample(calls, parties).items()}


def rpc_latency(calls: int, tcp: bool = True) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = peers.free_port()
    workers = [
        ctx.Process(target=peers.rpc_latency_worker, args=(r, port, calls, child, tcp), daemon=True)
        for r in (0, 1)
    ]
    for w in workers:
        w.start()
    if not parent.poll(600):
        raise RuntimeError("torch.distributed.rpc did not finish")
    times: list[float] = parent.recv()
    for w in workers:
        w.join(60)
    return quantiles(times)


def load(target: str, kind: str, clients: int, seconds: float, out: Connection) -> None:
    """In its own process: ``clients`` concurrent callers on one channel for ``seconds``
    (after a warm-up); sends the count of calls and the seconds they took."""

    async def main() -> tuple[int, float]:
        if kind == "echo":
            channel = grpc.aio.insecure_channel(target, options=OPTIONS)
            echo = channel.unary_unary(peers.ECHO_METHOD)
            raw = SMALL.tobytes()

            async def one() -> None:
                await echo(raw)

        else:  # "tensorwire": the fast lane where it can; "grpc": gRPC only
            client = tw.AsyncClient(target, timeout=60, fast_lane=kind != "grpc")

            async def one() -> None:
                await client.infer("identity", SMALL)

        for _ in range(200):
            await one()
        done = 0
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await one()
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(clients)))
        elapsed = time.perf_counter() - began
        await (channel.close() if kind == "echo" else client.close())
        return done, elapsed

    out.send(asyncio.run(main()))


def concurrent(target: str, kind: str, pid: int, args: argparse.Namespace) -> dict[str, float]:
    """Requests/s and the server's CPU per request under ``args.clients`` callers."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    driver = ctx.Process(target=load, args=(target, kind, args.clients, args.seconds, child))
    driver.start()
    # The driver warms up first; the server's CPU is read around the timed part only
    # roughly, so read it around the whole run and count the warm-up calls too.
    before = cpu_seconds(pid)
    done, elapsed = parent.recv()
    after = cpu_seconds(pid)
    driver.join()
    return {
        "requests_per_s": done / elapsed,
        "cpu_ms_per_request": (after - before) / (done + 200) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--wide", type=int, default=2048, metavar="H")
    parser.add_argument("--rounds", type=int, default=2, help="of the batching comparison")
    parser.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}

    sync_echo, sync_port = start(peers.grpc_echo_server)
    aio_echo, aio_port = start(peers.grpc_aio_echo_server)
    server, address = batching.start_server("cpu", batching=True)
    try:
        sync_channel = grpc.insecure_channel(f"127.0.0.1:{sync_port}", options=OPTIONS)
        aio_channel = grpc.insecure_channel(f"127.0.0.1:{aio_port}", options=OPTIONS)
        raw = SMALL.tobytes()
        with tw.Client(address, timeout=60) as client:
            results["sequential"] = sequential(
                args.calls,
                {
                    "bare sync grpcio echo": lambda: sync_channel.unary_unary(peers.ECHO_METHOD)(
                        raw
                    ),
                    "bare grpc.aio echo": lambda: aio_channel.unary_unary(peers.ECHO_METHOD)(raw),
                    "tensorwire identity": lambda: client.infer("identity", SMALL),
                },
            )
        sync_channel.close()
        aio_channel.close()
        if not args.no_rpc:
            results["sequential"]["torch.distributed.rpc (TCP)"] = rpc_latency(args.calls)
        results["concurrent"] = {
            "bare grpc.aio echo": concurrent(f"127.0.0.1:{aio_port}", "echo", aio_echo.pid, args),
            "tensorwire identity": concurrent(address, "tensorwire", server.pid, args),
        }
    finally:
        server.terminate()
        server.wait(30)
        for proc in (sync_echo, aio_echo):
            proc.kill()

    with tempfile.TemporaryDirectory() as folder:
        wide = argparse.Namespace(
            clients=args.clients,
            seconds=args.seconds,
            device="cpu",
            model=batching.wide_repo(args.wide, folder),
            model_repo=folder,
        )
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):
            for key, on in (("off", False), ("on", True)):
                r = batching.measure(wide, wide.model, on)
                if key not in best or r["throughput"] > best[key]["throughput"]:
                    best[key] = r
        results["wide"] = {"hidden": args.wide, "off": best["off"], "on": best["on"]}

    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    seq, con, wide = results["sequential"], results["concurrent"], results["wide"]
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"# control plane: {machine}, {os.cpu_count()} cores")
    print("\n| sequential [1,16] float32 | p50 µs | p99 µs |")
    print("|---|---:|---:|")
    for name, q in seq.items():
        print(f"| {name} | {q['p50_us']:.0f} | {q['p99_us']:.0f} |")
    print(f"\n| {args.clients} concurrent async callers | requests/s | server CPU ms / request |")
    print("|---|---:|---:|")
    for name, r in con.items():
        print(f"| {name} | {r['requests_per_s']:.0f} | {r['cpu_ms_per_request']:.3f} |")
    mlp = f"16-{wide['hidden']}-{wide['hidden']}-4 MLP, batch-1"
    print(f"\n| {mlp} | requests/s | p50 ms | p99 ms | requests per forward |")
    print("|---|---:|---:|---:|---:|")
    for key in ("off", "on"):
        r = wide[key]
        per = r["requests"] / max(r["executions"], 1)
        print(
            f"| batching {key} | {r['throughput']:.0f} | {r['p50'] * 1e3:.2f} | "
            f"{r['p99'] * 1e3:.2f} | {per:.2f} |"
        )
    ours = seq["tensorwire identity"]["p50_us"]
    floor = min(seq["bare sync grpcio echo"]["p50_us"], seq["bare grpc.aio echo"]["p50_us"])
    print("\ntargets:")
    print(f"- small-call p50 / faster bare echo: {ours / floor:.2f} (target <= 1.2)")
    if "torch.distributed.rpc (TCP)" in seq:
        peer = seq["torch.distributed.rpc (TCP)"]["p50_us"]
        print(f"- small-call p50 / torch.distributed.rpc over TCP: {ours / peer:.2f} (target < 1)")
    cpu = con["tensorwire identity"]["cpu_ms_per_request"]
    echo_cpu = con["bare grpc.aio echo"]["cpu_ms_per_request"]
    print(f"- server CPU per request / aio echo's: {cpu / echo_cpu:.2f} (target <= 2)")
    ratio = wide["on"]["throughput"] / wide["off"]["throughput"]
    print(f"- wide MLP batching on / off: {ratio:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
