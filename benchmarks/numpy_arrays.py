"""Remote NumPy arrays (issue 36): a NumPy workload fused into one program per result,
against the same operations as one Call per operation with keep=True, over a 1 Gbit/s
link, in one run.

    sudo .venv/bin/python benchmarks/numpy_arrays.py [--rows 4096] [--features 64] [--repeats 2]

A server namespace (10.77.0.1) and a client namespace (10.77.0.2) joined by a veth pair
(tests/support/netns.py; root, iproute2 and tc needed), each end limited to 1 Gbit/s by
a tbf qdisc. The reference workload (``workload``: standardise, a matmul chain, SVD,
FFT, reductions; over 30 NumPy operations) runs three ways on the same inputs: NumPy on
the client (the reference values and dtypes), remote arrays (lazy: one Run per
materialised result, which also keeps on the server the intermediates the results not
yet asked for share, and frees what nothing needs any more, in the same Run), and one
Call per operation with keep=True (each operation the
same ``numpy.apply`` step the graph holds, its results kept on the server, the
materialised results fetched with Get). Round trips are counted by a client wrapper
that sees every call, and Free calls by a spy on the client's session (none: what is
let go of rides on the next Run). What one way let go of is freed before the next is
timed. The upload of the input (one Put) is the same for both and is counted and timed
apart. Targets: values and dtypes as NumPy's; round trips == the
number of materialised results; >= 5x fewer round trips and >= 3x faster end to end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "client"))
sys.path.insert(0, str(ROOT / "server"))


def workload(x: Any, w1: Any, w2: Any, persist: Any = None) -> dict[str, Any]:
    """The reference workload: the same NumPy code for NumPy and remote arrays. Four
    results are looked at; everything else is an intermediate. ``persist``: called
    with the intermediates the results share (``ta.persist``), or not at all."""
    n = x.shape[0]
    mu = x.mean(axis=0)  # 1
    sigma = x.std(axis=0)  # 2
    z = (x - mu) / (sigma + 1e-6)  # 3, 4, 5
    cov = z.T @ z / n  # 6, 7, 8
    h = np.tanh(z @ w1)  # 9, 10
    h = np.maximum(h @ w2, 0.0)  # 11, 12
    logits = h - h.max(axis=1, keepdims=True)  # 13, 14
    p = np.exp(logits)  # 15
    p = p / p.sum(axis=1, keepdims=True)  # 16, 17
    entropy = -(p * np.log(p + 1e-9)).sum(axis=1).mean()  # 18-23
    _, s, vh = np.linalg.svd(cov)  # 24
    if persist is not None:
        persist(z, s, vh)
    explained = s[:8] / s.sum()  # 25, 26, 27
    projected = z @ vh[:8].T  # 28, 29, 30
    spectrum = np.abs(np.fft.rfft(projected, axis=0))  # 31, 32
    power = (spectrum**2).sum(axis=1)  # 33, 34
    peak = power[1:].argmax() + 1  # 35, 36, 37
    recon = np.fft.irfft(np.fft.rfft(z[:, 0]), n=n)  # 38, 39, 40
    error = np.linalg.norm(recon - z[:, 0]) / np.sqrt(n)  # 41-44
    return {"explained": explained, "entropy": entropy, "peak": peak, "error": error}


OPERATIONS = 44  # NumPy operations in workload, counted by its comments


def inputs(rows: int, features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(36)
    x = rng.standard_normal((rows, features)) * rng.uniform(0.5, 3, features)
    w1 = rng.standard_normal((features, features)) / np.sqrt(features)
    w2 = rng.standard_normal((features, features // 4)) / np.sqrt(features)
    return x.astype(np.float32), w1.astype(np.float32), w2.astype(np.float32)


class Counting:
    """A client wrapper that counts every call made through it (its round trips)."""

    def __init__(self, client: Any) -> None:
        self.client, self.trips, self.puts = client, 0, 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.trips += 1
        return self.client.run(*args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        self.trips += 1
        return self.client.call(*args, **kwargs)

    def get(self, tensor: Any) -> Any:
        self.trips += 1
        return self.client.get(tensor)

    def put(self, array: Any) -> Any:
        self.puts += 1
        return self.client.put(array)


def one_call_per_operation(counting: Counting, results: dict[str, Any]) -> dict[str, Any]:
    """Run the graph behind ``results`` one Call per operation (keep=True), then Get
    each result: the way to write the workload with calls and remote tensors."""
    from tensorwire.arrays.graph import Use, uses_in

    held: dict[tuple[int, int], Any] = {}

    def value(use: Use) -> Any:
        node = use.node
        if not node.function:
            return node.tensor if node.tensor is not None else node.data
        key = (id(node), use.index)
        if key not in held:
            deps = list(uses_in((node.args, node.kwargs)))
            for dep in deps:
                value(dep)
            out = counting.call(
                node.function, *resolve(node.args), keep=True, **resolve(node.kwargs)
            )
            outs = out if isinstance(out, tuple) else (out,)
            for i, tensor in enumerate(outs):
                held[(id(node), i)] = tensor
        return held[key]

    def resolve(arg: Any) -> Any:
        if isinstance(arg, Use):
            return value(arg)
        if isinstance(arg, list | tuple):
            return [resolve(a) for a in arg]
        if isinstance(arg, dict):
            return {k: resolve(v) for k, v in arg.items()}
        return arg

    fetched = {name: counting.get(value(r._use)) for name, r in results.items()}
    return fetched


def client_role(address: str, rows: int, features: int, repeats: int) -> dict[str, Any]:
    import tensorwire as tw
    import tensorwire.arrays as ta

    x, w1, w2 = inputs(rows, features)
    reference = workload(x, w1, w2)
    report: dict[str, Any] = {"rows": rows, "operations": OPERATIONS}
    with tw.Client(address, timeout=600) as client:
        counting = Counting(client)
        flush = client._session.free

        def counted_free(*args: Any) -> Any:  # Free calls of their own: round trips too
            counting.trips += 1
            return flush(*args)

        client._session.free = counted_free  # type: ignore[method-assign]
        began = time.perf_counter()
        remote = [ta.asarray(counting, a) for a in (x, w1, w2)]
        report["upload_s"] = time.perf_counter() - began
        for mode in ("fused", "calls", "alone", "persisted") * repeats:  # interleaved
            results = workload(*remote)  # a fresh graph each time: nothing cached
            gc.collect()
            client.session_info()  # frees what the way before let go of, untimed
            before = counting.trips
            began = time.perf_counter()
            if mode == "fused":  # every result in one program
                values = dict(zip(results, ta.compute(*results.values()), strict=True))
            elif mode == "calls":
                values = one_call_per_operation(counting, results)
            else:  # each result asked on its own, as a NumPy user would print them
                if mode == "persisted":  # the shared intermediates kept first
                    results = workload(*remote, persist=ta.persist)
                values = {name: np.asarray(r) for name, r in results.items()}
            seconds = time.perf_counter() - began
            best = report.setdefault(mode, {"seconds": float("inf")})
            best.update(trips=counting.trips - before, seconds=min(best["seconds"], seconds))
            for name, expected in reference.items():
                got, want = np.asarray(values[name]), np.asarray(expected)
                assert got.dtype == want.dtype, (mode, name, got.dtype, want.dtype)
                np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4, err_msg=name)
        report["results"] = len(results)
        report["dtypes"] = {k: str(np.asarray(v).dtype) for k, v in reference.items()}
    return report


def limit(namespace: str, link: str, rate: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", link, "root", "tbf",
         "rate", rate, "burst", "512kb", "latency", "50ms"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client_role(args.client, args.rows, args.features, args.repeats)))
        return
    from netns import SERVER_IP, two_hosts

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'client'}:{ROOT / 'server'}"}
    with two_hosts() as hosts:
        limit(hosts.server, hosts.server_link, args.rate)
        limit(hosts.client, hosts.client_link, args.rate)
        server = hosts.run(
            hosts.server, sys.executable, "-m", "tensorwire_server", "--host", SERVER_IP,
            "--port", "0", "--device", "cpu", "--insecure", stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        address = ""
        for line in server.stderr:  # type: ignore[union-attr]
            if m := re.search(r"listening on (\S+)", line):
                address = m.group(1)
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # type: ignore[union-attr]
        try:
            out = subprocess.run(
                ["ip", "netns", "exec", hosts.client, sys.executable, __file__,
                 "--rows", str(args.rows), "--features", str(args.features),
                 "--repeats", str(args.repeats), "--client", address],
                capture_output=True, text=True, timeout=1800, env=env,
            )  # fmt: skip
        finally:
            server.kill()
            server.wait()
    if out.returncode:
        raise SystemExit(out.stderr)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    fused, calls = report["fused"], report["calls"]
    print(f"\n{report['operations']} NumPy operations, {report['results']} results looked at, "
          f"x: {args.rows} x {args.features} float32, link {args.rate} (tbf) each way")  # fmt: skip
    print("\n| way | round trips | best seconds |\n|---|---:|---:|")
    print(f"| remote arrays, `compute` (one program) | {fused['trips']} | {fused['seconds']:.3f} |")
    one = report["alone"]
    print(f"| remote arrays, each result asked alone (`np.asarray`) | {one['trips']} | "
          f"{one['seconds']:.3f} |")  # fmt: skip
    kept = report["persisted"]
    print(f"| remote arrays, `persist(z, s, vh)`, then each alone | {kept['trips']} | "
          f"{kept['seconds']:.3f} |")  # fmt: skip
    print(f"| one Call per operation, keep=True, then Get | {calls['trips']} | "
          f"{calls['seconds']:.3f} |")  # fmt: skip
    print(f"\n- upload of the inputs (3 Puts, same for every way): {report['upload_s']:.3f} s")
    print(f"- round trips: {calls['trips'] / one['trips']:.1f}x fewer asking each result alone "
          f"(== results: {one['trips'] == report['results']}), "
          f"{calls['trips'] / fused['trips']:.1f}x fewer with compute")  # fmt: skip
    print(f"- end to end: {calls['seconds'] / one['seconds']:.1f}x faster alone, "
          f"{calls['seconds'] / fused['seconds']:.1f}x with compute")  # fmt: skip
    print(f"- dtypes (as NumPy's, checked every run): {report['dtypes']}")


if __name__ == "__main__":
    main()
