"""The fast lane between two hosts: ``benchmarks/fast_lane.py --two-hosts`` (root and
iproute2). A server namespace (10.77.0.1) and a client namespace (10.77.0.2) over a
veth pair, made by tests/support/netns.py as benchmarks/two_hosts.py makes them; every
server (tensorwire with ``--insecure``, the raw TCP echo, the bare grpc.aio echo, torch
RPC's callee) in the first, every caller in the second.

1. Sequential [1, 16] float32 round trips in turn (raw TCP ping-pong, aio echo,
   tensorwire over gRPC and over the lane), then the lane alone, then torch
   distributed.rpc over TCP (TensorPipe's uv transport, basic channel: peers.py) alone;
   ``--host-rounds`` times, the samples of every round pooled, so that the lane and
   torch RPC alternate through the run's drift.
2. ``--clients`` concurrent AsyncClient callers for ``--seconds``: requests/s and the
   server process's CPU per request, for the aio echo, gRPC and the lane.

Target (issue 33): the lane's p50 <= 0.8 x torch RPC over TCP's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
import control_plane as cp  # noqa: E402
import peers  # noqa: E402
import two_hosts as th  # noqa: E402
from support.netns import CLIENT_IP, SERVER_IP, Hosts, two_hosts  # noqa: E402

#: torch RPC's rendezvous (rank 0, the caller, in the client namespace) for each round.
RPC_PORT = 29611
LANE, GRPC, ECHO = "tensorwire infer, fast lane", "tensorwire infer, gRPC", "bare grpc.aio echo"
ALONE, RPC = "tensorwire infer, fast lane (alone)", "torch.distributed.rpc (TCP, alone)"


class Printer:
    """Stands in for a multiprocessing Connection in a namespace: what is sent is one
    JSON line on stdout, which the parent reads."""

    def send(self, obj: object) -> None:
        print(json.dumps(obj), flush=True)


def role(name: str, spec: dict[str, Any]) -> None:
    """One party, inside its namespace."""
    out: Any = Printer()
    if name == "tcp-echo":
        import fast_lane

        fast_lane.tcp_echo(out, SERVER_IP)
    elif name == "aio-echo":
        peers.grpc_aio_echo_server(out, SERVER_IP)
    elif name == "rpc":  # TensorPipe and gloo: their addresses on this end of the link
        os.environ.update(TP_SOCKET_IFNAME=spec["ifname"], GLOO_SOCKET_IFNAME=spec["ifname"])
        peers.rpc_latency_worker(spec["rank"], spec["port"], spec["calls"], out, True, CLIENT_IP)
    elif name == "calls":
        out.send(calls(spec))
    elif name == "load":
        cp.load(spec["target"], spec["kind"], spec["clients"], spec["seconds"], out)
    else:
        raise SystemExit(f"no role {name!r}")


def calls(spec: dict[str, Any]) -> dict[str, list[float]]:
    """The client namespace's sequential calls: seconds of each, in turn, then alone."""
    import fast_lane
    import grpc

    import tensorwire as tw

    small, payload = fast_lane.SMALL, fast_lane.SMALL.tobytes()
    raw, ping = fast_lane.pinger(SERVER_IP, spec["tcp_port"])
    channel = grpc.insecure_channel(f"{SERVER_IP}:{spec['echo_port']}", options=cp.OPTIONS)
    echo = channel.unary_unary(peers.ECHO_METHOD, None, None)  # bytes in, bytes out
    address, n = spec["address"], spec["calls"]
    with (
        tw.Client(address, timeout=60, fast_lane=False) as grpc_only,
        tw.Client(address, timeout=60) as lane,
    ):
        samples = cp.sample(
            n,
            {
                "raw TCP ping-pong, 64 B": ping,
                ECHO: lambda: echo(payload),
                GRPC: lambda: grpc_only.infer("identity", small),
                LANE: lambda: lane.infer("identity", small),
            },
        )
        # As torch RPC is timed: no other party's wake-ups between its calls.
        samples.update(cp.sample(n, {ALONE: lambda: lane.infer("identity", small)}))
        # The lane's rows are the lane's: granted, a connection pooled, no detour taken.
        found = lane._transport._methods["Infer"].lane
        if not (found.port and found.idle and found.detours.open(None)):
            raise RuntimeError("the lane's calls went through gRPC")
    channel.close()
    raw.close()
    return samples


def in_client(hosts: Hosts, name: str, spec: dict[str, Any]) -> Any:
    """Run one role in the client namespace; what it sent."""
    out = subprocess.run(
        ["ip", "netns", "exec", hosts.client, sys.executable, __file__, name, json.dumps(spec)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{name} in the client namespace failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_server(hosts: Hosts, name: str, spec: dict[str, Any]) -> tuple[Any, Any]:
    """Start one role in the server namespace; its process and its first line sent."""
    proc = hosts.run(
        hosts.server, sys.executable, __file__, name, json.dumps(spec), stdout=subprocess.PIPE
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    return proc, json.loads(line) if line else None


def rpc(hosts: Hosts, calls: int, port: int) -> list[float]:
    """torch RPC over TCP: the callee (rank 1) in the server namespace, the caller
    (rank 0, which also holds the rendezvous) in the client namespace."""
    spec = {"rank": 1, "port": port, "calls": calls, "ifname": hosts.server_link}
    callee = hosts.run(hosts.server, sys.executable, __file__, "rpc", json.dumps(spec))
    try:
        spec = {"rank": 0, "port": port, "calls": calls, "ifname": hosts.client_link}
        times: list[float] = in_client(hosts, "rpc", spec)
        callee.wait(120)
        return times
    finally:
        callee.kill()
        callee.wait()


def concurrent(
    hosts: Hosts, target: str, kind: str, pid: int, args: argparse.Namespace
) -> dict[str, float]:
    """As control_plane.concurrent, with the callers in the client namespace."""
    spec = {"target": target, "kind": kind, "clients": args.clients, "seconds": args.seconds}
    before = cp.cpu_seconds(pid)
    done, elapsed = in_client(hosts, "load", spec)
    after = cp.cpu_seconds(pid)
    return {
        "requests_per_s": done / elapsed,
        "cpu_ms_per_request": (after - before) / (done + 200) * 1e3,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts across the namespaces; the namespaces and every process removed after."""
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    # A SIGTERM (a timeout, a CI runner) unwinds through the finally blocks below, so
    # that the namespaces and the servers in them go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with two_hosts() as hosts:
        started: list[Any] = []
        try:
            server, address = th.serve_tensorwire(
                hosts, [], ["--no-dynamic-batching"], {"TENSORWIRE_ACCESS_LOG": "none"}
            )
            started.append(server)
            aio, echo_port = in_server(hosts, "aio-echo", {})
            started.append(aio)
            pooled: dict[str, list[float]] = {}
            for turn in range(args.host_rounds):
                tcp, tcp_port = in_server(hosts, "tcp-echo", {})  # it serves one connection
                started.append(tcp)
                spec = {"address": address, "tcp_port": tcp_port, "echo_port": echo_port}
                got = in_client(hosts, "calls", {**spec, "calls": args.calls})
                if not args.no_rpc:
                    got[RPC] = rpc(hosts, args.calls, RPC_PORT + turn)
                for name, samples in got.items():
                    pooled.setdefault(name, []).extend(samples)
            results["sequential"] = {name: cp.quantiles(s) for name, s in pooled.items()}
            results["concurrent"] = {
                ECHO: concurrent(hosts, f"{SERVER_IP}:{echo_port}", "echo", aio.pid, args),
                "tensorwire, gRPC": concurrent(hosts, address, "grpc", server.pid, args),
                "tensorwire, fast lane": concurrent(hosts, address, "tensorwire", server.pid, args),
            }
        finally:
            for proc in started:
                proc.kill()
                proc.wait()
    results["load_after"] = os.getloadavg()[0]
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    seq, con = results["sequential"], results["concurrent"]
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    load = f"load {results['load_before']:.1f} before, {results['load_after']:.1f} after"
    print(
        f"# fast lane, two namespaces over a veth pair: {machine}, {os.cpu_count()} cores, {load}"
    )
    rounds = f"two namespaces, {args.host_rounds} rounds pooled"
    print(f"\n| sequential [1,16] float32, {rounds} | p50 µs | p99 µs |")
    print("|---|---:|---:|")
    for name, q in seq.items():
        print(f"| {name} | {q['p50_us']:.0f} | {q['p99_us']:.0f} |")
    callers = f"{args.clients} concurrent async callers, two namespaces"
    print(f"\n| {callers} | requests/s | server CPU ms / request |")
    print("|---|---:|---:|")
    for name, r in con.items():
        print(f"| {name} | {r['requests_per_s']:.0f} | {r['cpu_ms_per_request']:.3f} |")
    print("\ntargets (two namespaces):")
    if RPC in seq:
        ratio = seq[ALONE]["p50_us"] / seq[RPC]["p50_us"]
        print(f"- lane p50 / torch RPC over TCP: {ratio:.2f} (target <= 0.8)")
    print(f"- lane p50 / gRPC p50: {seq[LANE]['p50_us'] / seq[GRPC]['p50_us']:.2f}")
    lane, echo = con["tensorwire, fast lane"], con[ECHO]
    cpu = lane["cpu_ms_per_request"] / echo["cpu_ms_per_request"]
    print(f"- lane server CPU per request / aio echo's: {cpu:.2f} (target <= 1.0)")


if __name__ == "__main__":
    role(sys.argv[1], json.loads(sys.argv[2]))
