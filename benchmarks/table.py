"""benchmarks/run.py's table: the label of every row it measures, the Markdown table and
the ratios printed after it, and the figure --plot draws."""

from __future__ import annotations

import sys
from pathlib import Path

from measuring import UNITS, human

TCP = "raw TCP, one way (floor)"
ECHO = "grpcio unary echo (floor)"
RPC = "torch.distributed.rpc identity, same-host defaults (peer)"
RPC_TCP = "torch.distributed.rpc identity, TCP forced (peer)"
SHM = "tritonclient identity, system shared memory (same host)"
CLIENT = "tensorwire Client identity (data port, TCP)"
ASYNC = "tensorwire AsyncClient identity (data port, TCP)"
LOCAL = "tensorwire Client identity, shared memory (same host)"
BASELINE = "tensorwire Client identity, shared memory (same host), --baseline tree"
IN_GRPC = "tensorwire Client identity, payloads in gRPC (data_plane=False)"
SERVER_RSS = "tensorwire server peak RSS growth / payload"
CLIENT_RSS = "tensorwire client peak RSS growth / payload"
GPU_H2D = "GPU host-to-device, unary request path"
GPU_H2D_STREAM = "GPU host-to-device, streamed request (chunks in, staged while arriving)"
GPU_H2D_FLOOR = "GPU host-to-device, torch pinned copy (floor)"
GPU_D2H = "GPU device-to-host, response path"
GPU_D2H_FLOOR = "GPU device-to-host, torch pinned copy (floor)"

Rows = dict[str, dict[int, float]]


def report(rows: Rows, sizes: list[int], latency: dict[str, float], notes: list[str]) -> None:
    print(f"\n| path | {' | '.join(human(s) for s in sizes)} |")
    print(f"|---|{'---|' * len(sizes)}")
    for name, by_size in rows.items():
        cells = [
            "n/a"
            if s not in by_size
            else f"{by_size[s]:.2f}x"
            if "RSS" in name
            else f"{human(by_size[s])}/s"
            for s in sizes
        ]
        print(f"| {name} | {' | '.join(cells)} |")
    print()
    for name in (CLIENT, ASYNC):
        for label, base in (
            (TCP, rows[TCP]),
            (RPC_TCP, rows.get(RPC_TCP, {})),
            (RPC, rows.get(RPC, {})),
        ):
            ratios = ", ".join(
                f"{human(s)}: {rows[name][s] / base[s]:.2f}" for s in sizes if s in base
            )
            if ratios:
                print(f"- {name} / {label}: {ratios}")
    for name in (LOCAL, BASELINE, SHM):  # issue 19's target: >= 3 x torch's same-host defaults
        if name in rows and RPC in rows:
            ratios = ", ".join(
                f"{human(s)}: {rows[name][s] / rows[RPC][s]:.2f}"
                for s in rows[name]
                if s in rows[RPC]
            )
            print(f"- {name} / {RPC}: {ratios}")
    for path in (GPU_H2D, GPU_H2D_STREAM):
        if path in rows:
            ratios = ", ".join(
                f"{human(s)}: {rows[path][s] / rows[GPU_H2D_FLOOR][s]:.2f}" for s in rows[path]
            )
            print(f"- {path} / torch pinned copy: {ratios}")
    for note in notes:
        print(f"- {note}")
    print(
        f"- small request [1,16] float32: tensorwire p50 {latency['tensorwire_p50']:.0f} us, "
        f"p99 {latency['tensorwire_p99']:.0f} us; grpcio echo p50 {latency['echo_p50']:.0f} us, "
        f"p99 {latency['echo_p99']:.0f} us; p50 ratio "
        f"{latency['tensorwire_p50'] / latency['echo_p50']:.2f}"
    )


def plot(rows: Rows, sizes: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install --group bench")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, by_size in rows.items():
        if "RSS" in name:
            continue
        xs = [s for s in sizes if s in by_size]
        ax.plot(xs, [by_size[s] / UNITS["G"] for s in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [human(s) for s in sizes])
    ax.set_xlabel("tensor size")
    ax.set_ylabel("throughput, GiB/s (round trip; TCP one way)")
    ax.set_title("tensorwire on loopback, every row from one run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}", file=sys.stderr)
