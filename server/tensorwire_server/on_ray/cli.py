"""python -m tensorwire_server.on_ray: deploy replicas on a Ray cluster and keep them
until SIGINT or SIGTERM, which drain them all.

    python -m tensorwire_server.on_ray --address HEAD:6379 --replicas 1 --max-replicas 4 \\
        --dns tensorwire.ray -- --model-repo /models --tls-cert ... (the server's flags)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tensorwire_server.cli import build_parser, settings_from
from tensorwire_server.on_ray.autoscale import Scaling
from tensorwire_server.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire_server.on_ray",
        description="Serve tensorwire on a Ray cluster: replicas spread over its nodes, "
        "each a whole tensorwire server on its node's address, taking the flags after "
        "'--' as tensorwire-server does.",
    )
    parser.add_argument(
        "--address", default="auto", help="the Ray cluster to join (default: auto, this node's)"
    )
    parser.add_argument("--replicas", type=int, default=1, help="replicas at least (1; never 0)")
    parser.add_argument(
        "--max-replicas", type=int, help="replicas at most, added on load (default: --replicas)"
    )
    parser.add_argument(
        "--target-load",
        type=float,
        default=8.0,
        help="calls per replica, running and queued, above which one is added (8)",
    )
    parser.add_argument(
        "--scale-up-seconds", type=float, default=3.0, help="load above target this long (3)"
    )
    parser.add_argument(
        "--scale-down-seconds",
        type=float,
        default=30.0,
        help="load that fits one replica fewer this long takes one away, drained (30)",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        help="GPUs per replica (default: 1 where the cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--num-cpus", type=float, default=1.0, help="CPUs per replica; fractions allowed (1)"
    )
    parser.add_argument(
        "--per-node",
        type=int,
        help="replicas one node may hold (default: its GPUs with --num-gpus, else 1); "
        "the Nth (from 0) listens on each fixed port + N",
    )
    parser.add_argument(
        "--dns",
        metavar="NAME",
        help="answer DNS A queries for NAME with the replicas' node addresses",
    )
    parser.add_argument(
        "--dns-address",
        metavar="HOST:PORT",
        help="where the DNS answers (default: this node's address, port 53)",
    )
    parser.add_argument(
        "--replicas-file", type=Path, help="keep the replicas' addresses here, one a line"
    )
    return parser


def _refusal(args: argparse.Namespace, settings: Settings) -> str | None:
    """Why these flags cannot make a fleet (checked before joining the cluster: a
    replica that fails to start is retried for ever); None: they can."""
    if settings.tls_cert is None and not settings.insecure:
        # The server refuses plain text off loopback, and replicas bind node addresses.
        return (
            "replicas listen on their nodes' addresses, reachable from other machines: "
            "give --tls-cert and --tls-key after '--', or --insecure if a trusted "
            "network protects the cluster"
        )
    if settings.tokens is not None:
        # Settings are every replica's creation arguments, which Ray keeps (pickled,
        # in its GCS) where anyone with the cluster's address can read them; a path is
        # harmless there, and each node reads the file itself.
        return (
            "tokens from TENSORWIRE_TOKENS would be kept in Ray's GCS with every "
            "replica's arguments: give --tokens-file FILE after '--' (on every node)"
        )
    if args.dns and settings.port == 0:
        return (
            "--dns needs a fixed --port: a name carries addresses, not ports, and "
            "replicas on port 0 each take a different one"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Deploy, keep the fleet until a signal, drain it."""
    argv = sys.argv[1:] if argv is None else argv
    ours, server_argv = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = _parser().parse_args(ours)
    server_args = build_parser("tensorwire-server (after --)").parse_args(server_argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(server_args)
        scaling = Scaling(
            minimum=args.replicas,
            maximum=args.max_replicas or args.replicas,
            target_load=args.target_load,
            up_seconds=args.scale_up_seconds,
            down_seconds=args.scale_down_seconds,
        )
        refused = _refusal(args, settings)
    except ValueError as exc:
        refused = str(exc)
    if refused:
        print(f"tensorwire on Ray: {refused}", file=sys.stderr)
        return 2
    try:
        import ray as imported
    except ImportError:
        print("tensorwire on Ray needs Ray: pip install 'tensorwire-server[ray]'", file=sys.stderr)
        return 2
    ray: Any = imported  # parts of its API carry no types
    # After ray: fleet imports it.
    from tensorwire_server.on_ray.dns import Responder
    from tensorwire_server.on_ray.fleet import Fleet, Placement
    from tensorwire_server.on_ray.replica import port_clash

    ray.init(address=args.address, logging_level=logging.WARNING)
    gpus = args.num_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    per_node = args.per_node or (
        max(1, int(max((n["Resources"].get("GPU", 0) for n in ray.nodes()), default=1)))
        if gpus
        else 1
    )
    clash = port_clash(settings, per_node)
    if clash:
        print(f"tensorwire on Ray: {clash}", file=sys.stderr)
        ray.shutdown()
        return 2
    dns = None
    if args.dns:
        host, _, port = (args.dns_address or f"{ray.util.get_node_ip_address()}:53").rpartition(":")
        dns = Responder(args.dns, host, int(port))
        logging.getLogger(__name__).info("DNS name %s on %s:%d", args.dns, host, dns.port)
    fleet = Fleet(
        settings,
        scaling,
        Placement(num_cpus=args.num_cpus, num_gpus=gpus, per_node=per_node),
        drain_grace=settings.shutdown_grace,
        dns=dns,
        list_file=args.replicas_file,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet.run(stop)
    ray.shutdown()
    return 0
