"""The tensorwire-server command."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Final

from tensorwire_server.server import serve
from tensorwire_server.settings import (
    ACCESS_LOGS,
    COMPILE_MODES,
    ENV_PREFIX,
    LOG_FORMATS,
    MODEL_CONTROLS,
    Settings,
)

#: The REST port the command serves on unless told otherwise (Triton's and KServe's).
HTTP_PORT: Final = 8000
_OFF: Final = -1


def _port_or_off(text: str) -> int:
    """A port number, or ``off`` (no REST listener)."""
    if text.strip().lower() == "off":
        return _OFF
    port = int(text)
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port")
    return port


def parse_model_option(option: str) -> tuple[str, str]:
    """Split a ``NAME=SOURCE`` command-line option."""
    name, sep, source = option.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--model expects NAME=SOURCE, got {option!r}")
    return name, source


def build_parser(prog: str = "tensorwire-server") -> argparse.ArgumentParser:
    """The server's flags: this command's, and those a deployment passes on to each
    replica (``python -m tensorwire_server.on_ray ... -- FLAGS``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve models, gradients and torch functions to tensorwire clients.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 50051; 0: any)")
    parser.add_argument(
        "--unix-socket",
        metavar="PATH",
        help="also serve on this Unix socket, for clients on this host (unix:PATH)",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="serve a model: a TorchScript file, a .pt2 torch.export file or AOTInductor "
        "package, or module:factory",
    )
    parser.add_argument(
        "--model-compile",
        choices=COMPILE_MODES,
        help="torch.compile the --model models in warm-up (default off; reduce-overhead: "
        "CUDA only)",
    )
    parser.add_argument(
        "--compile-cache-dir",
        metavar="DIR",
        help="keep compiled models here across restarts (default: Inductor's, under /tmp)",
    )
    parser.add_argument("--no-builtins", action="store_true", help="do not serve built-in models")
    parser.add_argument("--model-repo", metavar="DIR", help="serve a model repository")
    parser.add_argument(
        "--model-control",
        choices=MODEL_CONTROLS,
        help="explicit: Load and Unload RPCs change models while serving (default none)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="exit when any model fails to load (default: report it and serve the rest)",
    )
    parser.add_argument(
        "--no-dynamic-batching",
        action="store_true",
        help="run every request alone, even for models configured to batch",
    )
    parser.add_argument("--workers", type=int, help="threads running torch work (default 16)")
    parser.add_argument(
        "--chunk-size", type=int, help="payload bytes per streamed chunk (default 1 MiB)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="log lines (text)")
    parser.add_argument(
        "--access-log",
        choices=ACCESS_LOGS,
        help="RPCs that write an access record (default errors: those not OK)",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port"
    )
    parser.add_argument(
        "--health-port",
        type=int,
        help="also answer health checks (only) in plain text on this port, for probes",
    )
    parser.add_argument(
        "--http-port",
        type=_port_or_off,
        metavar="PORT|off",
        help=f"serve the KServe v2 REST API on this port (default {HTTP_PORT}; 0: any free; "
        "off: none)",
    )
    parser.add_argument(
        "--data-port",
        type=int,
        help="TCP port of the data port, where large payloads move beside gRPC (0: any free)",
    )
    parser.add_argument(
        "--no-data-plane", action="store_true", help="move every payload through gRPC"
    )
    parser.add_argument(
        "--no-same-host",
        action="store_true",
        help="do not offer clients on this host shared memory on the data port, nor "
        "the fast lane's Unix socket",
    )
    parser.add_argument(
        "--data-plane-connections",
        type=int,
        help="connections the data port and the same-host socket each hold (default 128)",
    )
    parser.add_argument(
        "--data-plane-transfers",
        type=int,
        help="data-plane transfers at once; more send chunks through gRPC (default 64)",
    )
    parser.add_argument(
        "--data-plane-transfers-per-caller",
        type=int,
        help="data-plane transfers one token holds at once (default 16)",
    )
    parser.add_argument(
        "--no-fast-lane",
        action="store_true",
        help="carry every call over gRPC: no fast lane on the data port's connections",
    )
    parser.add_argument(
        "--fast-lane-connections",
        type=int,
        help="fast-lane connections held at once (default 256)",
    )
    parser.add_argument(
        "--fast-lane-spin",
        type=float,
        metavar="SECONDS",
        help="poll without sleeping this long after each fast-lane answer, so a caller's "
        "next call finds the server awake (default 0.0005; 0: never)",
    )
    parser.add_argument(
        "--max-connection-age",
        type=float,
        metavar="SECONDS",
        help="ask clients to reconnect after this long, so DNS balancing finds new replicas",
    )
    security = parser.add_argument_group(
        "security", "TLS files and tokens (docs/security.md); tokens never on the command line"
    )
    security.add_argument("--tls-cert", metavar="PEM", help="certificate chain: serve TLS")
    security.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        default=None,  # not given: the environment decides
        help="allow plain text on an address other than loopback",
    )
    security.add_argument(
        "--tokens-file", metavar="FILE", help="bearer tokens, one 'NAME SCOPES TOKEN' per line"
    )
    limits = parser.add_argument_group("limits", "what one request may ask of the server")
    limits.add_argument("--max-request-bytes", type=int, help="payload bytes (default 8 GiB)")
    limits.add_argument("--max-tensor-elements", type=int, help="elements per tensor (2**32)")
    limits.add_argument(
        "--max-request-tensors", type=int, help="tensors one request may carry (4096)"
    )
    limits.add_argument(
        "--max-message-bytes", type=int, help="bytes of one unary message read (2 GiB - 1)"
    )
    limits.add_argument(
        "--max-concurrent-requests",
        type=int,
        help="calls in progress at once, every token together (64); public ones aside",
    )
    limits.add_argument(
        "--max-concurrent-streams", type=int, help="of those, streams open at once (48)"
    )
    limits.add_argument(
        "--max-calls-per-token",
        type=int,
        help="calls in progress each token is sure of; more while as many stay free (16)",
    )
    limits.add_argument(
        "--max-streams-per-token",
        type=int,
        help="streams open each token is sure of; more while as many stay free (16)",
    )
    limits.add_argument(
        "--max-public-calls",
        type=int,
        help="health checks, ServerLive and ServerReady running at once, no token needed (16)",
    )
    limits.add_argument(
        "--max-health-watches", type=int, help="health Watch streams open at once (8)"
    )
    limits.add_argument(
        "--max-stream-seconds", type=float, help="time a request stream may take (3600)"
    )
    limits.add_argument(
        "--default-deadline", type=float, help="seconds a call with no deadline may queue (600)"
    )
    limits.add_argument(
        "--shutdown-grace", type=float, help="seconds in-flight requests get after SIGTERM (30)"
    )
    sessions = parser.add_argument_group("sessions", "tensors and trainers kept between calls")
    sessions.add_argument(
        "--session-quota-bytes", type=int, help="device bytes one session may hold (4 GiB)"
    )
    sessions.add_argument(
        "--session-ttl", type=float, help="seconds a session may go unused before it is freed (600)"
    )
    sessions.add_argument("--max-sessions", type=int, help="sessions open at once (64)")
    sessions.add_argument(
        "--max-sessions-per-token", type=int, help="sessions one token may hold open (16)"
    )
    sessions.add_argument(
        "--session-bytes-per-token",
        type=int,
        help="device bytes all of one token's sessions may hold together (8 GiB)",
    )
    sessions.add_argument(
        "--max-session-bytes", type=int, help="device bytes all sessions may hold (32 GiB)"
    )
    shared = parser.add_argument_group(
        "shared memory", "Triton's system shared memory, off by default (docs/security.md)"
    )
    shared.add_argument(
        "--allow-shared-memory",
        action="store_true",
        default=None,  # not given: the environment decides
        help="let clients on this host register /dev/shm (and CUDA IPC) regions for inputs "
        "and outputs",
    )
    shared.add_argument(
        "--max-shared-memory-regions",
        type=int,
        help="regions one token may register, its sessions' included (64)",
    )
    shared.add_argument(
        "--max-shared-memory-bytes", type=int, help="bytes all regions may span (16 GiB)"
    )
    shared.add_argument(
        "--shared-memory-bytes-per-token",
        type=int,
        help="bytes one token's regions may span, its sessions' included (4 GiB)",
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings ``build_parser``'s flags ask for, over TENSORWIRE_* environment;
    ValueError names a wrong one."""
    extra = dict(parse_model_option(option) for option in args.model)
    base = Settings.from_env()
    # Flags named after settings (--max-request-bytes -> max_request_bytes) pass
    # straight through; None means "not given", so the environment's value stays.
    named = {f.name for f in fields(Settings)}
    overrides = {k: v for k, v in vars(args).items() if k in named}
    # The command serves REST on its port unless told otherwise (by the flag or
    # TENSORWIRE_HTTP_PORT); "off" from either is no REST (None).
    if args.http_port is None and base.http_port is None:
        off = os.environ.get(ENV_PREFIX + "HTTP_PORT", "").strip().lower() == "off"
        overrides["http_port"] = None if off else HTTP_PORT
    elif args.http_port == _OFF:
        overrides["http_port"] = None
    return Settings.from_env(
        **overrides,
        models={**base.models, **extra} or None,
        builtins=False if args.no_builtins else None,
        dynamic_batching=False if args.no_dynamic_batching else None,
        data_plane=False if args.no_data_plane else None,
        same_host=False if args.no_same_host else None,
        fast_lane=False if args.no_fast_lane else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse flags (over TENSORWIRE_* environment) and serve."""
    args = build_parser().parse_args(argv)
    try:
        serve(settings_from(args))
    except ValueError as exc:
        print(f"tensorwire-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
