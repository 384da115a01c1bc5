"""Health probe for containers: exit 0 when the server on this machine says SERVING.

    python -m tensorwire_server.probe [--target HOST:PORT] [--service NAME] [--timeout S]

Without ``--target`` it asks the server that the same TENSORWIRE_* environment
configures: on its ``health_port`` if it has one (plain text, as the container image
sets), else on its ``port``, which must then be plain text too. Exit status: 0
SERVING, 1 anything else (NOT_SERVING, unreachable, unknown service), 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorwire_server.settings import Settings

#: Addresses that listen everywhere, and where this machine reaches them.
_LOCAL = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


def local_target(settings: Settings) -> str:
    """Where a probe on this machine reaches the health service of ``settings``'s
    server; ValueError when only a TLS port offers it."""
    port = settings.health_port
    if port is None:
        if settings.tls_cert is not None:
            raise ValueError(
                "the server serves TLS only: set TENSORWIRE_HEALTH_PORT to give it a "
                "plain-text health port to probe, or pass --target"
            )
        port = settings.port
    host = _LOCAL.get(settings.host, settings.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    """Check health once; print the answer; exit 0 only for SERVING."""
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire_server.probe",
        description="Ask a tensorwire server's gRPC health service whether it serves.",
    )
    parser.add_argument("--target", help="HOST:PORT (default: from TENSORWIRE_* settings)")
    parser.add_argument(
        "--service", default="", help="service to ask about (default: the whole server)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    try:
        target = args.target or local_target(Settings.from_env())
    except ValueError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"probe: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{target}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
