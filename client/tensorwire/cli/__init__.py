"""The tensorwire command: describe a server, run a model on .npy/.npz files, show
model statistics, or load and unload models.

    tensorwire [--target HOST:PORT] [--timeout SECONDS] [CONNECTION] info [--json]
    tensorwire [--target HOST:PORT] [--timeout SECONDS] [CONNECTION] infer MODEL
        [--version N] --input SPEC [--input SPEC ...] --output PATH
        [--outputs NAME ...] [--progress | --no-progress]
    tensorwire [...] stats [MODEL] [--version N] [--json]
    tensorwire [...] load MODEL
    tensorwire [...] unload MODEL [--version N]

CONNECTION: [--tls] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]
[--server-name NAME] [--token-file FILE]. The token is read from a file or from
$TENSORWIRE_TOKEN, never from the command line, where ps would show it.

Exit status: 0 on success, 1 when the server or the connection failed, 2 for a
usage error (bad flags, a missing or unreadable file, a pickled array).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from tensorwire import __version__
from tensorwire.cli.display import ProgressBar, format_bytes, format_info, format_statistics
from tensorwire.cli.files import UsageError, load_inputs, npy_keeps, output_kind, write_outputs
from tensorwire.client import Client
from tensorwire.errors import TensorwireError

DEFAULT_TARGET: Final = "127.0.0.1:50051"
#: The environment variable holding the bearer token when --token-file is not given.
TOKEN_ENV: Final = "TENSORWIRE_TOKEN"
#: Info moves a few kilobytes: without --timeout it still gives up on a stuck server.
INFO_TIMEOUT: Final = 60.0

__all__ = [
    "ProgressBar",
    "UsageError",
    "build_parser",
    "format_bytes",
    "format_info",
    "format_statistics",
    "load_inputs",
    "main",
    "write_outputs",
]


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token: from --token-file, else $TENSORWIRE_TOKEN, else none."""
    if args.token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    path = Path(args.token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"--token-file {path}: cannot read: {reason}") from None
    if not token:
        raise UsageError(f"--token-file {path}: the file is empty")
    return token


def connect(args: argparse.Namespace, timeout: float | None) -> Client:
    """A client of --target with the connection flags' TLS and token."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together: a certificate and its key")
    if args.server_name is not None and not (args.tls or args.tls_ca or args.tls_cert):
        raise UsageError("--server-name names the server's TLS certificate: add --tls or --tls-ca")
    try:
        return Client(
            args.target,
            timeout=timeout,
            tls=True if args.tls else None,
            root_certificates=args.tls_ca,
            certificate_chain=args.tls_cert,
            private_key=args.tls_key,
            server_name=args.server_name,
            token=read_token(args),
        )
    except OSError as exc:  # a certificate or key file
        where = f"{exc.filename}: cannot read: " if exc.filename else ""
        raise UsageError(f"{where}{exc.strerror or exc}") from None
    except ValueError as exc:  # contradicting flags, or a token bound for plain text
        raise UsageError(str(exc)) from None


def _info(args: argparse.Namespace) -> int:
    timeout = INFO_TIMEOUT if args.timeout is None else args.timeout
    with connect(args, timeout) as client:
        info = client.info()
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=2))
    else:
        print(format_info(info, args.target))
    return 0


def _stats(args: argparse.Namespace) -> int:
    timeout = INFO_TIMEOUT if args.timeout is None else args.timeout
    with connect(args, timeout) as client:
        statistics = client.model_statistics(args.model, args.version)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in statistics], indent=2))
    else:
        print(format_statistics(statistics))
    return 0


def _load(args: argparse.Namespace) -> int:
    with connect(args, args.timeout) as client:
        model = client.load_model(args.model)
    versions = ", ".join(str(v.version) for v in model.versions if v.state == "READY")
    print(f"{model.name}: loaded, serving version{'s' if ',' in versions else ''} {versions}")
    if model.reason:
        print(f"{model.name}: {model.reason}")
    return 0


def _unload(args: argparse.Namespace) -> int:
    with connect(args, args.timeout) as client:
        client.unload_model(args.model, args.version)
    what = f"version {args.version}" if args.version else "every version"
    print(f"{args.model}: unloaded {what}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    path = Path(args.output)
    kind = output_kind(path)
    if kind == ".npy" and len(args.outputs or ()) > 1:
        raise UsageError(f"--output {path}: a .npy file holds one output; use .npz for several")
    inputs = load_inputs(args.input)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = ProgressBar(sys.stderr) if show else None
    try:
        with connect(args, args.timeout) as client:
            outputs = client.infer(
                args.model, inputs, outputs=args.outputs, version=args.version, progress=bar
            )
    finally:
        if bar is not None:
            bar.close()
    if kind == ".npy" and len(outputs) != 1:
        # Only known now (variadic models, undeclared outputs); nothing is written.
        names = ", ".join(outputs) or "none"
        raise UsageError(
            f"--output {path}: model {args.model!r} returned {len(outputs)} outputs ({names}); "
            "write them all to a .npz file, or pick one with --outputs NAME"
        )
    write_outputs(path, outputs)
    for name, arr in outputs.items():
        if not npy_keeps(arr.dtype):
            print(
                f"tensorwire: note: .npy has no code for {arr.dtype}: {name} is stored as raw "
                f"{arr.dtype.itemsize}-byte values; read it back with .view(ml_dtypes.{arr.dtype})",
                file=sys.stderr,
            )
    described = ", ".join(f"{name} {arr.dtype}{list(arr.shape)}" for name, arr in outputs.items())
    print(f"{args.model}: {described} -> {path}")
    return 0


def _version_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


class _RefuseToken(argparse.Action):
    """--token VALUE: refused, without repeating the value."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        parser.error(
            "--token: a token on the command line shows in ps and shell history; "
            f"use --token-file FILE or ${TOKEN_ENV}"
        )


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CAs (or --tls-ca)"
    )
    group.add_argument(
        "--tls-ca", metavar="FILE", help="PEM file of the CAs to trust (implies TLS)"
    )
    group.add_argument(
        "--tls-cert", metavar="FILE", help="PEM file of a client certificate chain (with --tls-key)"
    )
    group.add_argument("--tls-key", metavar="FILE", help="PEM file of the client certificate's key")
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the server's certificate carries, when not the target's host",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the bearer token sent on every call (default: ${TOKEN_ENV})",
    )
    # Named, so that it is not taken as an abbreviation of --token-file.
    group.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the tensorwire command."""
    parser = argparse.ArgumentParser(
        prog="tensorwire",
        description="Use a tensorwire server from the shell, with .npy and .npz files.",
    )
    parser.add_argument("--version", action="version", version=f"tensorwire {__version__}")
    parser.add_argument(
        "--target",
        default=os.environ.get("TENSORWIRE_TARGET") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the server (default: $TENSORWIRE_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        metavar="SECONDS",
        help=f"deadline of the call (default: {INFO_TIMEOUT:g} s for info and stats, else none)",
    )
    _connection_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe the server: device, models, functions")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=_info)

    infer = commands.add_parser(
        "infer",
        help="run a model on arrays from .npy/.npz files",
        description="Run MODEL on the --input arrays and write its outputs to --output.",
    )
    infer.add_argument("model", metavar="MODEL", help="the model's name (see tensorwire info)")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="FILE.npy (by position, in order), NAME=FILE.npy (by name) "
        "or FILE.npz (each member by its name); repeatable",
    )
    infer.add_argument(
        "--output",
        required=True,
        metavar="PATH",
        help="FILE.npy for the single output, or FILE.npz for every output by name",
    )
    infer.add_argument(
        "--outputs",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="return only these outputs",
    )
    infer.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show transfer progress on stderr (default: when stderr is a terminal)",
    )
    infer.add_argument(
        "--version",
        type=_version_number,
        default=0,
        metavar="N",
        help="run version N of the model (default: the newest serving)",
    )
    infer.set_defaults(run=_infer)

    stats = commands.add_parser(
        "stats",
        help="show what each model version has done: requests, batches, timings",
        description="Show the statistics of every version of MODEL (default: every model).",
    )
    stats.add_argument("model", metavar="MODEL", nargs="?", default="", help="the model's name")
    stats.add_argument(
        "--version",
        type=_version_number,
        default=0,
        metavar="N",
        help="only version N (default: every version)",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(run=_stats)

    load = commands.add_parser(
        "load",
        help="(re)load a model from the server's model repository",
        description="Load MODEL from the server's model repository, every version its "
        "folder holds now; the server must run with --model-control explicit.",
    )
    load.add_argument("model", metavar="MODEL", help="the model's folder name in the repository")
    load.set_defaults(run=_load)

    unload = commands.add_parser(
        "unload",
        help="stop serving a model, or one version of it",
        description="Stop serving MODEL (or its --version N) once requests in flight end; "
        "the server must run with --model-control explicit.",
    )
    unload.add_argument("model", metavar="MODEL", help="the model's name")
    unload.add_argument(
        "--version",
        type=_version_number,
        default=0,
        metavar="N",
        help="unload only version N (default: every version)",
    )
    unload.set_defaults(run=_unload)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tensorwire command; return its exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as exc:
        print(f"tensorwire: {exc}", file=sys.stderr)
        return 2
    except TensorwireError as exc:
        print(f"tensorwire: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tensorwire: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (tensorwire info | head): exit quietly, as the
        # Python docs advise, so the interpreter's final flush raises nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
