"""Remote tensors, measured: a 10-step chain of Call functions on one large tensor,
run through handles (the tensor stays on the server) against the same steps shipping
the data to and fro on every call, in one run against one server.

    .venv/bin/python benchmarks/handles.py [--mib 64] [--steps 10] [--repeats 3] [--device cpu]

Both paths start from the same NumPy array on the client and end with the result
there, and their results are checked equal. Reported: seconds per chain (best of
``--repeats`` after a warm-up), the ratio, and the bytes each path moved.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np
from batching import start_server  # benchmarks/ is the script's folder: on sys.path

import tensorwire as tw

# Cheap elementwise steps, so the chain measures movement rather than arithmetic;
# each maps [-1, 1] into itself so the values stay finite over any number of steps.
CHAIN = (("tanh", ()), ("mul", (0.5,)), ("sin", ()), ("neg", ()), ("tanh", ()))


def step(index: int) -> tuple[str, tuple[Any, ...]]:
    return CHAIN[index % len(CHAIN)]


def shipping(client: tw.Client, x: np.ndarray, steps: int) -> np.ndarray:
    """Every step sends its input and receives its output."""
    y = x
    for i in range(steps):
        function, extra = step(i)
        y = client.call(function, y, *extra)
    return y


def through_handles(client: tw.Client, x: np.ndarray, steps: int) -> np.ndarray:
    """One upload, ``steps`` calls on handles, one download."""
    held = client.put(x)
    kept = [held]
    for i in range(steps):
        function, extra = step(i)
        held = client.call(function, held, *extra, keep=True)
        kept.append(held)
    result = held.numpy()
    for handle in kept:
        handle.free()
    return result


def best(fn: Any, repeats: int) -> tuple[float, np.ndarray]:
    times = []
    result = None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    assert result is not None
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n = args.mib * (1 << 20) // 4
    x = np.random.default_rng(0).uniform(-1, 1, n).astype(np.float32)
    proc, address = start_server(args.device, batching=True)
    try:
        with tw.Client(address, timeout=600) as client:
            shipping(client, x[: 1 << 20], 2)  # warm-up: connections, allocator
            through_handles(client, x[: 1 << 20], 2)
            data_s, by_data = best(lambda: shipping(client, x, args.steps), args.repeats)
            handle_s, by_handle = best(lambda: through_handles(client, x, args.steps), args.repeats)
    finally:
        proc.terminate()
        proc.wait(30)
    np.testing.assert_array_equal(by_data, by_handle)
    moved_data = 2 * args.steps * x.nbytes
    moved_handle = 2 * x.nbytes
    print(f"# remote tensors: a {args.steps}-step chain on a {args.mib} MiB float32 tensor")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, device {args.device}")
    print("| path | seconds per chain | payload bytes moved |")
    print("|---|---:|---:|")
    print(f"| shipping data every call | {data_s:.3f} | {moved_data / 2**20:.0f} MiB |")
    label = f"handles (put, {args.steps} x keep, get)"
    print(f"| {label} | {handle_s:.3f} | {moved_handle / 2**20:.0f} MiB |")
    print(f"ratio data / handles: {data_s / handle_s:.2f}x")


if __name__ == "__main__":
    main()
