"""The client half of tests/deploy/test_ray.py, run inside the head node's namespace
with the fleet's DNS as its resolver; prints what happened as one JSON line.

    python tests/support/ray_client.py MODE TARGET [JSON]

MODE: ``calls`` (``n`` mlp calls), ``load`` (``threads`` callers of mlp for
``seconds``, then how many failed and why), ``stats`` (mlp requests each address of
TARGET, a comma list, has answered), ``big`` (an identity round trip of ``mib`` MiB,
then the server's data-port metrics from ``metrics``), ``session`` (open a session,
then ask it again after ``wait_file`` appears). JSON may hold ``ca`` and ``token``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import numpy as np

import tensorwire as tw

X = np.linspace(-1, 1, 64 * 16, dtype=np.float32).reshape(64, 16)


def client(target: str, opts: dict[str, Any], timeout: float = 60) -> tw.Client:
    return tw.Client(
        target, timeout=timeout, root_certificates=opts.get("ca"), token=opts.get("token")
    )


def failure(exc: tw.TensorwireError) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def calls(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    failed = []
    with client(target, opts) as c:
        for _ in range(opts.get("n", 20)):
            try:
                c.infer("mlp", X)
            except tw.TensorwireError as exc:
                failed.append(failure(exc))
    return {"failed": failed}


def load(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    stop = time.monotonic() + opts["seconds"]
    done: Counter[str] = Counter()
    lock = threading.Lock()

    def caller(c: tw.Client) -> None:
        while time.monotonic() < stop:
            try:
                c.infer("mlp", X)
                outcome = "ok"
            except tw.TensorwireError as exc:
                outcome = failure(exc)
            with lock:
                done[outcome] += 1

    with client(target, opts, timeout=opts.get("deadline", 60)) as c:
        threads = [threading.Thread(target=caller, args=(c,)) for _ in range(opts["threads"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"ok": done.pop("ok", 0), "failed": dict(done)}


def stats(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    counts = {}
    for address in target.split(","):
        with client(address, opts, timeout=20) as one:
            try:
                counts[address] = sum(s.requests for s in one.model_statistics("mlp"))
            except tw.UnavailableError:  # a replica just listed, not answering yet
                counts[address] = 0  # (whoever polls asks again, within its own bound)
    return {"requests": counts}


def big(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    array = np.arange((opts["mib"] << 20) // 4, dtype=np.float32)
    with client(target, opts) as c:
        out = c.infer("identity", array)["output"]
    with urllib.request.urlopen(opts["metrics"], timeout=20) as answer:
        metrics = answer.read().decode()
    tcp = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("tensorwire_data_plane_bytes_total{") and 'path="tcp"' in line
    ]
    return {"equal": bool(np.array_equal(out, array)), "tcp_bytes": sum(tcp)}


def session(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    with client(target, opts, timeout=opts.get("deadline", 20)) as c:
        opened = c.session_info().session
        print(json.dumps({"opened": opened}), flush=True)
        while not os.path.exists(opts["wait_file"]):
            time.sleep(0.1)
        began = time.monotonic()
        try:
            c.session_info()
            return {"again": "ok"}
        except tw.TensorwireError as exc:
            return {
                "again": type(exc).__name__,
                "message": str(exc),
                "seconds": time.monotonic() - began,
            }


def latency(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    """p50 of ``n`` small mlp calls (ms), after 50 to warm up; ``raw``: the ``Info``
    RPC through a bare gRPC stub instead (with ``application`` metadata, for Serve)."""
    small = X[:2]
    times = []
    if opts.get("raw"):
        import grpc

        from tensorwire.v1 import tensorwire_pb2 as pb
        from tensorwire.v1 import tensorwire_pb2_grpc as pbg

        metadata = [("application", opts["raw"])] if opts["raw"] != "direct" else None
        with grpc.insecure_channel(target) as channel:
            stub = pbg.TensorServiceStub(channel)
            for i in range(opts["n"] + 50):
                began = time.perf_counter()
                stub.Info(pb.InfoRequest(), metadata=metadata, timeout=30)
                if i >= 50:
                    times.append(time.perf_counter() - began)
    else:
        with client(target, opts) as c:
            for i in range(opts["n"] + 50):
                began = time.perf_counter()
                c.infer("mlp", small)
                if i >= 50:
                    times.append(time.perf_counter() - began)
    return {"p50_ms": 1000 * float(np.median(times))}


def roundtrip(target: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Best of ``repeats`` identity round trips of ``mib`` MiB: (sent + received) MiB/s."""
    array = np.arange((opts["mib"] << 20) // 4, dtype=np.float32)
    best = float("inf")
    with client(target, opts, timeout=300) as c:
        for _ in range(opts["repeats"]):
            began = time.perf_counter()
            c.infer("identity", array)
            best = min(best, time.perf_counter() - began)
    return {"mib_s": 2 * opts["mib"] / best}


def main() -> None:
    mode, target = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    modes = {
        "calls": calls,
        "load": load,
        "stats": stats,
        "big": big,
        "session": session,
        "latency": latency,
        "roundtrip": roundtrip,
    }
    print(json.dumps(modes[mode](target, opts)), flush=True)


if __name__ == "__main__":
    main()
