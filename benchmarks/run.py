"""One command, one table: tensorwire against its floors and a peer, measured in one run.

    .venv/bin/python benchmarks/run.py [--sizes 1M,64M,1G,3G] [--repeats 3]
        [--plot docs/benchmarks.png] [--json results.json] [--baseline ../before]

Every party runs as its own process on 127.0.0.1: raw TCP (one way; the floor), a bare
grpcio unary echo, torch.distributed.rpc (TensorPipe) returning the tensor, and
tensorwire's identity model through Client and AsyncClient, over the data port's
TCP port and, for comparison, with every payload in gRPC; and the same-host paths:
tensorwire's Client passing shared memory (the default on one host), and tritonclient
through Triton's system shared memory. ``--baseline TREE`` adds the same-host row of
another checkout (``git worktree add ../before <commit>``), its client and server, in
the same run: a before/after against the same floors. Round-trip throughput is
(bytes sent + bytes received) / best time; the TCP floor is one-way bytes / best time.
Peak RSS growth is VmHWM, reset before each size, over the payload size. On a machine
with CUDA, the request path's host-to-device (and the response path's device-to-host)
bandwidth is measured against torch's own pinned-memory copy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import peers
from gpu_copies import measure_gpu
from measuring import (
    best_of,
    human,
    interleaved_latencies,
    make_payload,
    parse_size,
    peak_rss,
    reset_peak_rss,
    start_process,
    start_tensorwire,
)
from table import (
    ASYNC,
    BASELINE,
    CLIENT,
    CLIENT_RSS,
    ECHO,
    IN_GRPC,
    LOCAL,
    RPC,
    RPC_TCP,
    SERVER_RSS,
    SHM,
    TCP,
    Rows,
    plot,
    report,
)

import tensorwire as tw

# One gRPC message (and protobuf) cannot carry more: the echo floor stops here.
ONE_MESSAGE = 2**31 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,64M,1G,3G")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument("--no-rpc", action="store_true", help="skip torch.distributed.rpc")
    parser.add_argument("--plot", type=Path, help="write a PNG of throughput against size")
    parser.add_argument("--json", type=Path, help="write every figure as JSON")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another commit (git worktree add): its client and server's "
        "same-host row, measured in this run beside this tree's",
    )
    parser.add_argument("--same-host-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.same_host_only:  # the --baseline party: this process imports that tree
        print(json.dumps(same_host_row(sizes, args.repeats)))
        return
    rows: Rows = {}
    notes: list[str] = []

    tcp, port_pipe = start_process(peers.tcp_sink)
    tcp_sock = socket.create_connection(("127.0.0.1", port_pipe.recv()))
    echo, port_pipe = start_process(peers.grpc_echo_server)
    echo_port = port_pipe.recv()
    tw_proc, tw_address = start_tensorwire()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=options)
    echo_call = channel.unary_unary(peers.ECHO_METHOD)
    # The data port's rows: a client on the server's host would pass shared memory.
    client = tw.Client(tw_address, timeout=None, same_host=False)
    local = tw.Client(tw_address, timeout=None)
    try:
        for size in sizes:
            repeats = args.repeats if size < (1 << 30) else max(1, args.repeats - 1)
            payload = make_payload(size)
            measure_floors(rows, size, repeats, payload, tcp_sock, echo_call)
            notes += measure_tensorwire(rows, size, repeats, payload, client, tw_proc.pid)
            rows.setdefault(LOCAL, {})[size] = 2 * size / same_host_best(local, payload, repeats)
            del payload
            print(f"  measured {human(size)}", file=sys.stderr)
        if args.baseline is not None:
            rows[BASELINE] = baseline_row(args.baseline, sizes, args.repeats)
        if not args.no_rpc:
            rows[RPC_TCP] = measure_rpc(sizes, args.repeats, tcp=True)
            rows[RPC] = measure_rpc(sizes, args.repeats, tcp=False)
        small = np.ones((1, 16), np.float32)
        latency = interleaved_latencies(
            args.latency_calls,
            lambda: client.infer("identity", small),
            lambda: echo_call(small.tobytes()),
        )
        rows[SHM] = measure_shared_memory(
            tw_address, [s for s in sizes if s <= 1 << 30], args.repeats
        )
        if gpu := measure_gpu([s for s in sizes if s <= (1 << 30)], args.repeats):
            rows.update(gpu)
    finally:
        client.close()
        local.close()
        channel.close()
        tcp_sock.close()
        tw_proc.terminate()
        tw_proc.wait(30)
        for proc in (tcp, echo):
            proc.kill()
    report(rows, sizes, latency, notes)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "latency_us": latency}, indent=1))
    if args.plot:
        plot(rows, sizes, args.plot)


def measure_floors(
    rows: Rows, size: int, repeats: int, payload: np.ndarray, tcp_sock: Any, echo_call: Any
) -> None:
    view = memoryview(payload)
    rows.setdefault(TCP, {})[size] = size / peers.tcp_send_seconds(tcp_sock, view, repeats)
    if size <= ONE_MESSAGE:
        raw = payload.tobytes()
        rows.setdefault(ECHO, {})[size] = 2 * size / best_of(repeats, lambda: echo_call(raw))
        del raw


def measure_tensorwire(
    rows: Rows, size: int, repeats: int, payload: np.ndarray, client: tw.Client, server_pid: int
) -> list[str]:
    notes = []
    reset_peak_rss(server_pid)
    server_before = peak_rss(server_pid)
    reset_peak_rss("self")
    client_before = peak_rss("self")
    results: list[np.ndarray] = []

    def round_trip() -> None:
        results[:] = []  # the previous result goes before the next arrives
        results.append(client.infer("identity", payload)["output"])

    rows.setdefault(CLIENT, {})[size] = 2 * size / best_of(repeats, round_trip)
    rows.setdefault(SERVER_RSS, {})[size] = (peak_rss(server_pid) - server_before) / size
    rows.setdefault(CLIENT_RSS, {})[size] = (peak_rss("self") - client_before) / size
    if size > ONE_MESSAGE:
        sent, got = zlib.crc32(payload), zlib.crc32(results[0])
        verdict = "intact" if sent == got and results[0].shape == payload.shape else "CORRUPT"
        notes.append(f"{human(size)} round trip {verdict}: crc32 sent {sent:08x}, got {got:08x}")
    results.clear()

    async def async_best() -> float:
        async with tw.AsyncClient(client.target, timeout=None, same_host=False) as ac:
            best = float("inf")
            for i in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                await ac.infer("identity", payload)
                if i:
                    best = min(best, time.perf_counter() - start)
            return best

    rows.setdefault(ASYNC, {})[size] = 2 * size / asyncio.run(async_best())
    with tw.Client(client.target, timeout=None, data_plane=False) as in_grpc:
        best = best_of(repeats, lambda: in_grpc.infer("identity", payload))
        rows.setdefault(IN_GRPC, {})[size] = 2 * size / best
    return notes


def same_host_best(client: tw.Client, payload: np.ndarray, repeats: int) -> float:
    """tensorwire's own same-host path: the payload copied into a pooled segment, the
    result an array over another (kept until the next call, as a caller would)."""
    results: list[np.ndarray] = []

    def round_trip() -> None:
        results[:] = []  # the previous result goes (its segment back to the pool)
        results.append(client.infer("identity", payload)["output"])

    best = best_of(repeats, round_trip)
    # Every byte, not a prefix: a race shows up anywhere in the payload.
    if results[0].shape != payload.shape or not np.array_equal(results[0], payload):
        raise RuntimeError("the same-host round trip came back different")
    return best


def same_host_row(sizes: list[int], repeats: int) -> dict[int, float]:
    """The same-host row alone, with a server of its own: what --baseline runs."""
    proc, address = start_tensorwire()
    try:
        with tw.Client(address, timeout=None) as local:
            return {
                size: 2 * size / same_host_best(local, make_payload(size), repeats)
                for size in sizes
            }
    finally:
        proc.terminate()
        proc.wait(30)


def baseline_row(tree: Path, sizes: list[int], repeats: int) -> dict[int, float]:
    """The same-host row of another checkout's client and server, from a process whose
    imports come from that tree (this script, run there with --same-host-only)."""
    tree = tree.resolve()
    env = {**os.environ, "PYTHONPATH": f"{tree / 'client'}{os.pathsep}{tree / 'server'}"}
    sizes_arg = ",".join(str(s) for s in sizes)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--same-host-only",
            "--sizes",
            sizes_arg,
            "--repeats",
            str(repeats),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def measure_shared_memory(address: str, sizes: list[int], repeats: int) -> dict[int, float]:
    """Triton's system shared memory from tritonclient, as its users call it: the input
    written into a region, identity run on it, the output read in place from another
    (a view; a caller who keeps it copies it); (sent + received) / best time."""
    import tritonclient.grpc as triton

    with triton.InferenceServerClient(address) as client:
        return {size: 2 * size / shared_memory_best(client, size, repeats) for size in sizes}


def shared_memory_best(client: Any, size: int, repeats: int) -> float:
    import tritonclient.grpc as triton
    import tritonclient.utils.shared_memory as shm

    payload = make_payload(size)
    names = (f"tw-bench-in-{os.getpid()}", f"tw-bench-out-{os.getpid()}")
    regions = [shm.create_shared_memory_region(name, f"/{name}", size) for name in names]
    try:
        for name in names:
            client.register_system_shared_memory(name, f"/{name}", size)
        sent = triton.InferInput("input", [size], "UINT8")
        sent.set_shared_memory(names[0], size)
        wanted = triton.InferRequestedOutput("output")
        wanted.set_shared_memory(names[1], size)

        def round_trip() -> None:
            shm.set_shared_memory_region(regions[0], [payload])
            client.infer("identity", [sent], outputs=[wanted])
            shm.get_contents_as_numpy(regions[1], np.uint8, [size])

        return best_of(repeats, round_trip)
    finally:
        client.unregister_system_shared_memory()
        for region in regions:
            shm.destroy_shared_memory_region(region)


def measure_rpc(sizes: list[int], repeats: int, tcp: bool) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = peers.free_port()
    workers = [
        ctx.Process(
            target=peers.rpc_worker, args=(r, port, sizes, repeats, tcp, child), daemon=True
        )
        for r in (0, 1)
    ]
    for w in workers:
        w.start()
    if not parent.poll(1200):
        raise RuntimeError("torch.distributed.rpc did not finish")
    results: dict[int, float] = parent.recv()
    for w in workers:
        w.join(60)
    return {s: 2 * s / t for s, t in results.items()}


if __name__ == "__main__":
    main()
