"""The fast lane (issue 33), measured in one run against gRPC, torch.distributed.rpc and
the bare floors, every server its own process on 127.0.0.1.

    .venv/bin/python benchmarks/fast_lane.py [--calls 2000] [--clients 32] [--seconds 6]
        [--rounds 30] [--two-hosts | --only-two-hosts] [--host-rounds 2] [--json out.json]

``--two-hosts`` (root and iproute2) first measures 1 and 2 across two network
namespaces over a veth pair, servers in one and callers in the other, against torch
RPC over TCP (benchmarks/lane_two_hosts.py); ``--only-two-hosts`` measures just that.

1. Sequential [1, 16] float32 round trips, p50 and p99, sampled in turn so that drift
   on a shared machine hits all alike: a raw TCP ping-pong (Python sockets, 64 B), a
   bare grpc.aio echo, tensorwire ``infer("identity")`` over gRPC and over the lane;
   then the lane, and torch.distributed.rpc with its defaults (shared memory on one
   host) and forced onto TCP, each timed on its own (the targets compare these).
2. ``--clients`` concurrent AsyncClient callers for ``--seconds``: requests/s and the
   server process's CPU per request, for the bare grpc.aio echo, gRPC and the lane.
3. 64 KiB and 1 MiB identity round trips (median of ``--rounds``), gRPC against lane.

Targets (issue 33, one run on the 2-core machine): small-call p50 <= 0.8 x torch RPC's
defaults; server CPU per small request <= 1.0 x the aio echo's; 32 callers' throughput
>= 2 x gRPC's; 64 KiB and 1 MiB round trips >= 1.5 x gRPC's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import batching
import control_plane as cp
import peers

import tensorwire as tw

SMALL = np.ones((1, 16), np.float32)


def tcp_echo(port_out: Connection, host: str = "127.0.0.1") -> None:
    """Accept one connection; echo whatever arrives (the floor of a round trip)."""
    with socket.create_server((host, 0)) as server:
        port_out.send(server.getsockname()[1])
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def pinger(host: str, port: int) -> tuple[socket.socket, Callable[[], None]]:
    """A connection to ``tcp_echo`` and one 64 B round trip on it."""
    raw = socket.create_connection((host, port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = SMALL.tobytes()

    def ping() -> None:
        raw.sendall(payload)
        got = 0
        while got < len(payload):
            got += len(raw.recv(65536))

    return raw, ping


def sizes(address: str, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of identity round trips of 64 KiB and 1 MiB, gRPC and lane."""
    out: dict[str, dict[str, float]] = {}
    with (
        tw.Client(address, timeout=60, fast_lane=False) as grpc_only,
        tw.Client(address, timeout=60) as lane,
    ):
        for label, n in (("64 KiB", 64 << 10), ("1 MiB", 1 << 20)):
            x = np.ones(n // 4, np.float32)
            times: dict[str, list[float]] = {"gRPC": [], "lane": []}
            for _ in range(3):
                grpc_only.infer("identity", x)
                lane.infer("identity", x)
            for _ in range(rounds):
                for name, client in (("gRPC", grpc_only), ("lane", lane)):
                    began = time.perf_counter()
                    client.infer("identity", x)
                    times[name].append(time.perf_counter() - began)
            out[label] = {name: statistics.median(t) for name, t in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc")
    parser.add_argument("--two-hosts", action="store_true", help="also across two namespaces")
    parser.add_argument("--only-two-hosts", action="store_true", help="skip the same host")
    parser.add_argument("--host-rounds", type=int, default=2, help="two hosts: lane/RPC turns")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.two_hosts or args.only_two_hosts:
        import lane_two_hosts  # root and iproute2; imports tests/support/netns.py

        results["two_hosts"] = lane_two_hosts.run(args)
        lane_two_hosts.report(results["two_hosts"], args)
    if not args.only_two_hosts:
        same_host(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def same_host(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Every party its own process on 127.0.0.1; adds to ``results`` and prints."""

    echo, echo_port = cp.start(tcp_echo)
    aio_echo, aio_port = cp.start(peers.grpc_aio_echo_server)
    server, address = batching.start_server(
        "cpu", batching=False, env={"TENSORWIRE_ACCESS_LOG": "none"}
    )
    try:
        raw, ping = pinger("127.0.0.1", echo_port)
        payload = SMALL.tobytes()
        aio_channel = grpc.insecure_channel(f"127.0.0.1:{aio_port}", options=cp.OPTIONS)
        aio = aio_channel.unary_unary(peers.ECHO_METHOD, None, None)  # bytes in, bytes out
        with (
            tw.Client(address, timeout=60, fast_lane=False) as grpc_only,
            tw.Client(address, timeout=60) as lane,
        ):
            results["sequential"] = cp.sequential(
                args.calls,
                {
                    "raw TCP ping-pong, 64 B": ping,
                    "bare grpc.aio echo": lambda: aio(payload),
                    "tensorwire infer, gRPC": lambda: grpc_only.infer("identity", SMALL),
                    "tensorwire infer, fast lane": lambda: lane.infer("identity", SMALL),
                },
            )
            # Timed alone too, as torch.distributed.rpc is below: no other party's
            # wake-ups between its calls.
            results["sequential"].update(
                cp.sequential(
                    args.calls,
                    {"tensorwire infer, fast lane (alone)": lambda: lane.infer("identity", SMALL)},
                )
            )
        aio_channel.close()
        raw.close()
        if not args.no_rpc:
            seq = results["sequential"]
            seq["torch.distributed.rpc (defaults)"] = cp.rpc_latency(args.calls, tcp=False)
            seq["torch.distributed.rpc (TCP)"] = cp.rpc_latency(args.calls, tcp=True)
        echo_target = f"127.0.0.1:{aio_port}"
        results["concurrent"] = {
            "bare grpc.aio echo": cp.concurrent(echo_target, "echo", aio_echo.pid, args),
            "tensorwire, gRPC": cp.concurrent(address, "grpc", server.pid, args),
            "tensorwire, fast lane": cp.concurrent(address, "tensorwire", server.pid, args),
        }
        results["sizes"] = sizes(address, args.rounds)
    finally:
        server.terminate()
        server.wait(30)
        for proc in (echo, aio_echo):
            proc.kill()
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    seq, con, big = results["sequential"], results["concurrent"], results["sizes"]
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"# fast lane: {machine}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("\n| sequential [1,16] float32, same host | p50 µs | p99 µs |")
    print("|---|---:|---:|")
    for name, q in seq.items():
        print(f"| {name} | {q['p50_us']:.0f} | {q['p99_us']:.0f} |")
    print(f"\n| {args.clients} concurrent async callers | requests/s | server CPU ms / request |")
    print("|---|---:|---:|")
    for name, r in con.items():
        print(f"| {name} | {r['requests_per_s']:.0f} | {r['cpu_ms_per_request']:.3f} |")
    print("\n| identity round trip, median | gRPC ms | fast lane ms | speed-up |")
    print("|---|---:|---:|---:|")
    for label, t in big.items():
        print(
            f"| {label} | {t['gRPC'] * 1e3:.2f} | {t['lane'] * 1e3:.2f} | "
            f"{t['gRPC'] / t['lane']:.2f} |"
        )
    ours = seq["tensorwire infer, fast lane (alone)"]["p50_us"]
    print("\ntargets:")
    if "torch.distributed.rpc (defaults)" in seq:
        peer = seq["torch.distributed.rpc (defaults)"]["p50_us"]
        print(f"- lane p50 / torch RPC defaults: {ours / peer:.2f} (target <= 0.8)")
        tcp = seq["torch.distributed.rpc (TCP)"]["p50_us"]
        print(f"- lane p50 / torch RPC over TCP: {ours / tcp:.2f}")
    lane, echo, grpc_path = (
        con["tensorwire, fast lane"],
        con["bare grpc.aio echo"],
        con["tensorwire, gRPC"],
    )
    cpu = lane["cpu_ms_per_request"] / echo["cpu_ms_per_request"]
    print(f"- lane server CPU per request / aio echo's: {cpu:.2f} (target <= 1.0)")
    tput = lane["requests_per_s"] / grpc_path["requests_per_s"]
    print(f"- {args.clients} callers' throughput, lane / gRPC: {tput:.2f} (target >= 2)")
    for label, t in big.items():
        print(f"- {label} round trip, gRPC / lane: {t['gRPC'] / t['lane']:.2f} (target >= 1.5)")


if __name__ == "__main__":
    main()
