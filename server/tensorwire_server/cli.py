"""The tensorwire-server command."""

from __future__ import annotations

import argparse
import sys

from tensorwire_server.models import parse_model_option
from tensorwire_server.server import serve
from tensorwire_server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """Parse flags (over TENSORWIRE_* environment) and serve."""
    parser = argparse.ArgumentParser(
        prog="tensorwire-server",
        description="Serve models, gradients and torch functions to tensorwire clients.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 50051; 0: any)")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="serve a model: a .pt2 torch.export file, a TorchScript file or module:factory",
    )
    parser.add_argument("--no-builtins", action="store_true", help="do not serve built-in models")
    parser.add_argument("--workers", type=int, help="request threads (default 16)")
    parser.add_argument(
        "--chunk-size", type=int, help="payload bytes per streamed chunk (default 1 MiB)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    args = parser.parse_args(argv)
    try:
        extra = dict(parse_model_option(option) for option in args.model)
        base = Settings.from_env()
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            device=args.device,
            models={**base.models, **extra} or None,
            builtins=False if args.no_builtins else None,
            workers=args.workers,
            chunk_size=args.chunk_size,
            log_level=args.log_level,
        )
        serve(settings)
    except ValueError as exc:
        print(f"tensorwire-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
