"""tensorwire on a two-node Ray cluster, against one plain server, in one run.

    sudo .venv/bin/python benchmarks/ray_cluster.py [--mib 256] [--seconds 15] [--calls 500]

The cluster of tests/deploy/test_ray.py (tests/support/ray_cluster.py): a Ray head
(10.77.0.1) and a worker (10.77.0.2) in two network namespaces over a veth pair, the
fleet on the head, clients in the head's namespace resolving the fleet's DNS name.
Measured (issue 28's targets):

- throughput of 32 callers of mlp (batch 64) through the name: 2 replicas / 1 replica;
- an identity round trip of ``--mib`` MiB to the worker's replica against a plain
  ``tensorwire-server`` on the worker (same link, same run): (sent + received) / best;
- the routes: p50 of a small mlp call through the DNS name against the same call to
  one replica's address; and where Ray Serve is installed (``ray[serve]``), p50 of one
  unary RPC (Info) through Serve's gRPC ingress (its proxy, then a Serve replica that
  answers at once) against the same RPC sent straight to a tensorwire replica.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.ray_cluster import (  # noqa: E402
    HEAD_IP,
    NAME,
    PORT,
    WORKER_IP,
    end_session,
    fleet,
    ray_cluster,
    wait_for_line,
)

TARGET = f"{NAME}:{PORT}"
WORKER = f"{WORKER_IP}:{PORT}"
HEAD = f"{HEAD_IP}:{PORT}"
SINGLE_PORT = 50061
SERVE_PORT = 9000


def serve_app() -> None:
    """Run in the head's namespace: Ray Serve with its gRPC ingress, serving
    tensorwire's TensorService whose Info a Serve replica answers at once."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from tensorwire.v1 import tensorwire_pb2 as pb

    # The cluster's head: without it, Serve would start a cluster of its own here.
    ray.init(address=f"{HEAD_IP}:6379")
    serve.start(
        http_options=HTTPOptions(host=HEAD_IP, port=8000),
        grpc_options=gRPCOptions(
            port=SERVE_PORT,
            grpc_servicer_functions=[
                "tensorwire.v1.tensorwire_pb2_grpc.add_TensorServiceServicer_to_server"
            ],
        ),
    )

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Ingress:
        def Info(self, request: Any) -> Any:  # Serve calls the RPC by its name
            return pb.InfoResponse()

    serve.run(Ingress.bind(), name="tw", route_prefix="/tw")
    print("serve ready", flush=True)
    while True:  # until the benchmark ends this process's session
        time.sleep(3600)


class Results(dict[str, Any]):
    """Measurements, each printed as it comes (a later failure keeps the earlier)."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{key}: {value}", flush=True)

    def add(self, key: str, value: float) -> None:
        self[key] = [*self.get(key, []), value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--serve-app", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_app:
        serve_app()
        return
    out = Results()
    with ray_cluster() as cluster:
        # One plain server on the worker: the two-namespace figure of the same link.
        single = cluster.spawn(
            "single", cluster.hosts.client, sys.executable, "-m", "tensorwire_server",
            "--host", WORKER_IP, "--port", str(SINGLE_PORT), "--device", "cpu", "--insecure",
        )  # fmt: skip
        wait_for_line(cluster, "single", "server serving")
        single_at = f"{WORKER_IP}:{SINGLE_PORT}"
        big = {"timeout": 600, "mib": args.mib, "repeats": 3}
        out.add("single_mib_s", cluster.client("roundtrip", single_at, **big)["mib_s"])
        load = {"threads": 32, "seconds": args.seconds}
        with fleet(cluster, "--replicas", "1", server=("--insecure",)) as one:
            one.wait_for(1)
            done = cluster.client("load", TARGET, timeout=300, **load)
            out["one_replica_calls_s"] = done["ok"] / args.seconds
        with fleet(cluster, "--replicas", "2", server=("--insecure",)) as two:
            two.wait_for(2)
            done = cluster.client("load", TARGET, timeout=300, **load)
            out["two_replicas_calls_s"] = done["ok"] / args.seconds
            for _ in range(2):  # interleaved with the plain server's, which still runs
                out.add("ray_replica_mib_s", cluster.client("roundtrip", WORKER, **big)["mib_s"])
                out.add("single_mib_s", cluster.client("roundtrip", single_at, **big)["mib_s"])
            end_session(single)
            for _ in range(2):  # interleaved: the machine's load drifts
                for key, target in (("direct", WORKER), ("head", HEAD), ("name", TARGET)):
                    p50 = cluster.client("latency", target, n=args.calls)["p50_ms"]
                    out.add(f"p50_ms_{key}", p50)
            if importlib.util.find_spec("ray.serve") is not None:
                serve = cluster.spawn(
                    "serve", cluster.hosts.server, sys.executable, __file__, "--serve-app"
                )
                try:
                    wait_for_line(cluster, "serve", "serve ready")
                    for _ in range(2):
                        for key, target, raw in (
                            ("info_direct", WORKER, "direct"),
                            ("info_serve", f"{HEAD_IP}:{SERVE_PORT}", "tw"),
                        ):
                            p50 = cluster.client("latency", target, n=args.calls, raw=raw)
                            out.add(f"p50_ms_{key}", p50["p50_ms"])
                finally:
                    end_session(serve)
    # Best of each: the highest throughput, the lowest p50.
    best = {
        k: (max(v) if k.endswith("mib_s") else min(v)) if isinstance(v, list) else v
        for k, v in out.items()
    }
    print(json.dumps(out))
    print(f"2 replicas / 1: {best['two_replicas_calls_s'] / best['one_replica_calls_s']:.2f}")
    print(f"Ray replica / single server, {args.mib} MiB: "
          f"{best['ray_replica_mib_s'] / best['single_mib_s']:.2f}")  # fmt: skip
    print(f"p50 by name / direct: {best['p50_ms_name'] / best['p50_ms_direct']:.2f}")
    both = max(best["p50_ms_direct"], best["p50_ms_head"])
    print(f"p50 by name / the slower replica's direct: {best['p50_ms_name'] / both:.2f}")
    if "p50_ms_info_serve" in best:
        print(
            f"Info p50 through Serve's ingress / direct: "
            f"{best['p50_ms_info_serve'] / best['p50_ms_info_direct']:.2f}"
        )


if __name__ == "__main__":
    main()
