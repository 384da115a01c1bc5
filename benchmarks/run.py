"""One command, one table: tensorwire against its floors and a peer, measured in one run.

    .venv/bin/python benchmarks/run.py [--sizes 1M,64M,1G] [--repeats 3]

Every party runs as its own process on 127.0.0.1: raw TCP (one way; the floor),
a bare grpcio unary echo, torch.distributed.rpc (TensorPipe) returning the tensor, and
tensorwire's identity model through Client and AsyncClient. Round-trip throughput is
(bytes sent + bytes received) / best time; the TCP floor is one-way bytes / best time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import peers

import tensorwire as tw

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1].upper()]) if text[-1].isalpha() else int(text)


def human(n: float) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def best_of(repeats: int, fn) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def start_process(target, *args):  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def start_tensorwire() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire_server", "--port", "0", "--device", "auto"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"listening on (\S+)", line):
            return proc, m.group(1)
    raise RuntimeError("tensorwire server did not start")


def peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,64M,1G")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows: dict[str, dict[int, float]] = {}

    # Floors: raw TCP one way, and a bare grpcio unary echo.
    tcp, port_pipe = start_process(peers.tcp_sink)
    tcp_sock = socket.create_connection(("127.0.0.1", port_pipe.recv()))
    echo, port_pipe = start_process(peers.grpc_echo_server)
    echo_port = port_pipe.recv()
    tw_proc, tw_address = start_tensorwire()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=options)
    echo_call = channel.unary_unary(peers.ECHO_METHOD)
    client = tw.Client(tw_address, timeout=None)
    try:
        for size in sizes:
            measure_size(rows, size, args.repeats, tcp_sock, echo_call, client, tw_proc.pid)
            print(f"  measured {human(size)}", file=sys.stderr)
        if not args.no_rpc:
            rows["torch.distributed.rpc identity (peer)"] = measure_rpc(sizes, args.repeats)
        # Small-request latency: [1, 16] float32 through tensorwire, its bytes through echo.
        small = np.ones((1, 16), np.float32)
        lat_tw = latencies(args.latency_calls, lambda: client.infer("identity", small))
        lat_echo = latencies(args.latency_calls, lambda: echo_call(small.tobytes()))
    finally:
        client.close()
        channel.close()
        tcp_sock.close()
        tw_proc.terminate()
        tw_proc.wait(30)
        for proc in (tcp, echo):
            proc.kill()
    report(rows, sizes, lat_tw, lat_echo)


def measure_size(rows, size, repeats, tcp_sock, echo_call, client, server_pid):  # type: ignore[no-untyped-def]
    payload = np.full(size, 7, dtype=np.uint8)
    raw = payload.tobytes()
    rows.setdefault("raw TCP, one way (floor)", {})[size] = size / peers.tcp_send_seconds(
        tcp_sock, memoryview(payload), repeats
    )
    rows.setdefault("grpcio unary echo (floor)", {})[size] = (
        2 * size / best_of(repeats, lambda: echo_call(raw))
    )
    peak_rss_reset(server_pid)
    before = peak_rss(server_pid)
    rows.setdefault("tensorwire Client identity", {})[size] = (
        2 * size / best_of(repeats, lambda: client.infer("identity", payload))
    )
    rows.setdefault("tensorwire server peak RSS growth / payload", {})[size] = (
        peak_rss(server_pid) - before
    ) / size

    async def async_round() -> None:
        async with tw.AsyncClient(client.target, timeout=None) as ac:
            await ac.infer("identity", payload)

    rows.setdefault("tensorwire AsyncClient identity", {})[size] = (
        2 * size / best_of(repeats, lambda: asyncio.run(async_round()))
    )


def measure_rpc(sizes: list[int], repeats: int) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = peers.free_port()
    workers = [
        ctx.Process(target=peers.rpc_worker, args=(r, port, sizes, repeats, child), daemon=True)
        for r in (0, 1)
    ]
    for w in workers:
        w.start()
    if not parent.poll(600):
        raise RuntimeError("torch.distributed.rpc did not finish")
    results = parent.recv()
    for w in workers:
        w.join(60)
    return {s: 2 * s / t for s, t in results.items()}


def report(rows, sizes, lat_tw, lat_echo) -> None:  # type: ignore[no-untyped-def]
    print(f"\n| path | {' | '.join(human(s) for s in sizes)} |")
    print(f"|---|{'---|' * len(sizes)}")
    for name, by_size in rows.items():
        cells = [f"{by_size[s]:.2f}x" if "RSS" in name else f"{human(by_size[s])}/s" for s in sizes]
        print(f"| {name} | {' | '.join(cells)} |")
    floor = rows["raw TCP, one way (floor)"]
    for name in ("tensorwire Client identity", "tensorwire AsyncClient identity"):
        ratios = ", ".join(f"{human(s)}: {rows[name][s] / floor[s]:.2f}" for s in sizes)
        print(f"\n{name} / raw TCP: {ratios}")
    print(
        f"\nsmall request [1,16] float32: tensorwire p50 {lat_tw[0] * 1e6:.0f} us, "
        f"p99 {lat_tw[1] * 1e6:.0f} us; grpcio echo p50 {lat_echo[0] * 1e6:.0f} us, "
        f"p99 {lat_echo[1] * 1e6:.0f} us; p50 ratio {lat_tw[0] / lat_echo[0]:.2f}"
    )


def latencies(calls: int, fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    for _ in range(100):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49], cuts[98]


if __name__ == "__main__":
    main()
