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
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO, Final, TextIO

import numpy as np

from tensorwire import __version__
from tensorwire.client import Client
from tensorwire.errors import TensorwireError
from tensorwire.types import ModelInfo, Progress, ServerInfo, TensorSpec, VersionStatistics
from tensorwire.wire.dtypes import NAMES, wire_dtype

DEFAULT_TARGET: Final = "127.0.0.1:50051"
#: The environment variable holding the bearer token when --token-file is not given.
TOKEN_ENV: Final = "TENSORWIRE_TOKEN"
#: Info moves a few kilobytes: without --timeout it still gives up on a stuck server.
INFO_TIMEOUT: Final = 60.0

_NPY_MAGIC: Final = b"\x93NUMPY"
_ZIP_MAGIC: Final = b"PK\x03\x04"
_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")


class UsageError(Exception):
    """A problem with the command line or its files: exit status 2."""


# ---------------------------------------------------------------------- progress


def _scale(nbytes: float) -> tuple[float, str]:
    """The divisor and binary unit that show ``nbytes`` with 1-4 integer digits."""
    divisor = 1.0
    for unit in _UNITS[:-1]:
        if nbytes < 1024 * divisor:
            return divisor, unit
        divisor *= 1024
    return divisor, _UNITS[-1]


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in B, KiB, MiB, GiB or TiB: "512 B", "1.50 GiB"."""
    divisor, unit = _scale(nbytes)
    return f"{nbytes:.0f} B" if unit == "B" else f"{nbytes / divisor:.2f} {unit}"


class ProgressBar:
    """A progress callback drawing one line per stage on ``stream``, redrawn with "\\r".

    Draws at most once per ``interval`` seconds of ``clock``, but always the start
    and the end (100%) of each stage; ``close`` ends a line a failed call left open.
    A stage that starts again from 0 (a retried upload) gets a new line.
    """

    WIDTH: Final = 24

    def __init__(
        self,
        stream: TextIO,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self._stage: str | None = None
        self._started = 0.0
        self._drawn_at = 0.0
        self._finished = False
        self._done = 0  # bytes of the last report, to tell a restarted stage
        self._width = 0  # of the last line drawn, to blank what a shorter one leaves

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        again = progress.done == 0 and self._done > 0
        self._done = progress.done
        if progress.stage != self._stage or again:
            self.close()
            self._stage, self._started, self._finished = progress.stage, now, False
        elif self._finished:
            return  # a stream may report its last chunk twice: 100% is drawn once
        else:
            complete = progress.done >= progress.total
            if not complete and now - self._drawn_at < self.interval:
                return
        self._draw(progress, now)
        if progress.done >= progress.total:
            self._finished = True
            self.close()

    def close(self) -> None:
        """End the current line, if one is drawn."""
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _draw(self, progress: Progress, now: float) -> None:
        fraction = min(max(progress.fraction, 0.0), 1.0)
        filled = int(fraction * self.WIDTH)
        divisor, unit = _scale(progress.total)
        if unit == "B":
            amount = f"{progress.done}/{progress.total} B"
        else:
            amount = f"{progress.done / divisor:.2f}/{progress.total / divisor:.2f} {unit}"
        line = (
            f"{progress.stage:<8} [{'#' * filled}{'-' * (self.WIDTH - filled)}] "
            f"{int(fraction * 100):3d}%  {amount}"
        )
        elapsed = now - self._started
        # A unary call reports its start and end together: no meaningful rate then.
        if elapsed >= self.interval and progress.done:
            line += f"  {format_bytes(progress.done / elapsed)}/s"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)
        self._drawn_at = now


# ---------------------------------------------------------------------- files


def _magic(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(len(_NPY_MAGIC))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a .npy or .npz file") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None


def _checked(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr``, if it holds no Python objects and its dtype can travel."""
    if arr.dtype.hasobject:
        raise UsageError(
            f"{path}: {name} holds Python objects (a pickled array); "
            "refusing to unpickle it: save plain numeric arrays"
        )
    try:
        wire_dtype(arr.dtype)
    except ValueError:
        # .npy has no code for bfloat16: np.save writes it as raw bytes (|V2).
        hint = " (raw bytes: a saved bfloat16 reads back so)" if arr.dtype.kind == "V" else ""
        raise UsageError(
            f"{path}: {name} has dtype {arr.dtype}{hint}, which cannot travel; "
            f"supported: {', '.join(NAMES)}"
        ) from None
    return arr


def _load_npy(path: Path) -> np.ndarray:
    # Read the header first: a pickled array would only fail mmap with a vague message.
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            header = (
                np.lib.format.read_array_header_1_0(f)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(f)
            )
        except ValueError as exc:
            raise UsageError(f"{path}: not a valid .npy file: {exc}") from None
    _checked(path, "the array", np.empty(0, dtype=header[2]))
    try:
        # Mapped, not read: the client copies the bytes out once, as it sends them.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    return _checked(path, "the array", arr)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    # Archive members cannot be mapped; each is read into memory once.
    try:
        with np.load(path, allow_pickle=False) as archive:
            members = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UsageError(
                f"{path}: a member holds Python objects (a pickled array); refusing to unpickle it"
            ) from None
        raise UsageError(f"{path}: cannot read: {exc}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    if not members:
        raise UsageError(f"{path}: the archive holds no arrays")
    return {name: _checked(path, repr(name), arr) for name, arr in members.items()}


def _split_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH``; a path with "=" in it can be given as ./a=b.npy."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        if not rest:
            raise UsageError(f"--input {spec}: no file after '='")
        return name, Path(rest)
    return None, Path(spec)


def load_inputs(specs: Sequence[str]) -> list[np.ndarray] | dict[str, np.ndarray]:
    """The arrays of the --input specs: a list bound by position, or a dict by name."""
    positional: list[np.ndarray] = []
    named: dict[str, np.ndarray] = {}
    for spec in specs:
        name, path = _split_spec(spec)
        magic = _magic(path)
        if magic.startswith(_ZIP_MAGIC):
            if name is not None:
                raise UsageError(
                    f"--input {spec}: a .npz archive binds its members by their own names; "
                    "drop the NAME="
                )
            arrays = _load_npz(path)
        elif magic == _NPY_MAGIC:
            if name is None:
                positional.append(_load_npy(path))
                continue
            arrays = {name: _load_npy(path)}
        else:
            raise UsageError(f"{path}: not a .npy or .npz file")
        for key, arr in arrays.items():
            if key in named:
                raise UsageError(f"input {key!r} is given twice (again by --input {spec})")
            named[key] = arr
    if positional and named:
        raise UsageError(
            "--input: give every input by position (FILE.npy) or every input by name "
            "(NAME=FILE.npy, FILE.npz), not a mix"
        )
    return named if named else positional


def _output_kind(path: Path) -> str:
    kind = path.suffix.lower()
    if kind not in (".npy", ".npz"):
        raise UsageError(f"--output {path}: the name must end in .npy (one output) or .npz")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"--output {path}: no such directory {parent}")
    if path.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    return kind


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A new file in ``path``'s directory that replaces ``path`` only once complete."""
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # os.open applies the umask to 0o666, unlike mkstemp's private 0o600.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _npy_keeps(dtype: np.dtype) -> bool:
    """Whether a .npy header records ``dtype``; ml_dtypes' bfloat16 becomes raw bytes."""
    return bool(np.dtype(np.lib.format.dtype_to_descr(dtype)) == dtype)


def write_outputs(path: Path, outputs: Mapping[str, np.ndarray]) -> None:
    """Write one output to a .npy file or every output to a .npz file, atomically."""
    try:
        with _atomic(path) as f:
            if path.suffix.lower() == ".npy":
                (arr,) = outputs.values()
                np.lib.format.write_array(f, arr, allow_pickle=False)
            else:
                _write_npz(f, outputs)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write: {exc.strerror or exc}") from None


def _write_npz(f: IO[bytes], outputs: Mapping[str, np.ndarray]) -> None:
    # np.savez's own parameters (file, allow_pickle) would clash with output names
    # passed as keywords; this writes the same uncompressed archive without that.
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, arr in outputs.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


# ---------------------------------------------------------------------- info


def _spec(spec: TensorSpec) -> str:
    dtype = spec.dtype or "any"
    if spec.shape is None:
        return f"{spec.name}: {dtype}"
    dims = ", ".join("?" if d < 0 else str(d) for d in spec.shape)
    return f"{spec.name}: {dtype}[{dims}]"


def _signature(model: ModelInfo) -> str:
    inputs = ", ".join(_spec(s) for s in model.inputs)
    if model.variadic:
        inputs = ", ".join(filter(None, (inputs, "**named")))
    outputs = ", ".join(_spec(s) for s in model.outputs) or "?"
    return f"({inputs}) -> ({outputs})"


def _seconds(seconds: float) -> str:
    """A short duration: "0.5 ms", "12 ms", "1.5 s"."""
    if seconds >= 1:
        return f"{seconds:g} s"
    return f"{seconds * 1000:.3g} ms"


def _serving(model: ModelInfo) -> str:
    """How ``model`` serves, in one line: state, versions, batching, devices."""
    ready = [str(v.version) for v in model.versions if v.state == "READY"]
    failed = [str(v.version) for v in model.versions if v.state != "READY"]
    parts = [model.state]
    if ready:
        parts.append(f"version{'s' if len(ready) > 1 else ''} {', '.join(ready)}")
    if failed:
        parts.append(f"failed version{'s' if len(failed) > 1 else ''} {', '.join(failed)}")
    if model.max_batch_size:
        batching = f"batch <= {model.max_batch_size}"
        dynamic = model.dynamic_batching
        if dynamic is not None:
            batching += f", dynamic (delay {_seconds(dynamic.max_queue_delay)}"
            if dynamic.preferred_batch_sizes:
                batching += f", preferred {'/'.join(map(str, dynamic.preferred_batch_sizes))}"
            batching += ")"
        parts.append(batching)
    if model.instances:
        parts.append("on " + ", ".join(model.instances))
    if model.precision and model.precision != "float32":  # float32: as loaded
        parts.append(f"autocast {model.precision}")
    return "; ".join(parts)


def format_info(info: ServerInfo, target: str) -> str:
    """A server's description as text for people."""
    device = info.device
    memory = ""
    if device.total_memory_bytes:
        memory = (
            f", {format_bytes(device.free_memory_bytes)} free"
            f" of {format_bytes(device.total_memory_bytes)}"
        )
    lines = [
        f"server:    {target}, tensorwire {info.server_version}, torch {info.torch_version}",
        f"device:    {device.name} ({device.description}){memory}",
        f"models:    {len(info.models)}",
    ]
    for name in sorted(info.models):
        model = info.models[name]
        params = f", {model.parameter_count:,} parameters" if model.parameter_count else ""
        lines.append(f"  {name} {_signature(model)}")
        lines.append(f"      {model.kind or 'not loaded'}{params}: {model.description}")
        lines.append(f"      {_serving(model)}")
        if model.reason:
            lines.append(f"      reason: {model.reason}")
    lines.append(f"functions: {len(info.functions)} (tensorwire info --json lists them)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- stats

#: The columns of the stats table: header and cell of a version's statistics.
_STATS_COLUMNS: Final[tuple[tuple[str, Callable[[VersionStatistics], str]], ...]] = (
    ("model", lambda s: s.model),
    ("version", lambda s: str(s.version)),
    ("requests", lambda s: str(s.requests)),
    ("failures", lambda s: str(s.failures)),
    ("inferences", lambda s: str(s.inferences)),
    ("executions", lambda s: str(s.executions)),
    # Mean wait per request answered, and mean time per forward pass.
    (
        "mean queue ms",
        lambda s: f"{1000 * s.queue_seconds / s.requests:.3f}" if s.requests else "-",
    ),
    (
        "mean compute ms",
        lambda s: f"{1000 * s.compute_seconds / s.executions:.3f}" if s.executions else "-",
    ),
    (
        "batch sizes (rows:passes)",
        lambda s: " ".join(f"{rows}:{n}" for rows, n in sorted(s.batch_sizes.items())) or "-",
    ),
)
#: Columns aligned left; the others are numbers, aligned right.
_TEXT_COLUMNS: Final = frozenset({"model", "batch sizes (rows:passes)"})


def format_statistics(statistics: Sequence[VersionStatistics]) -> str:
    """Model statistics as a table for people, one row per version: counts, the mean
    queue wait per request and compute time per forward pass in milliseconds, and
    how many forward passes ran with each batch size. Rejected (queue full) and
    expired (deadline passed in the queue) requests, counted among the failures, are
    noted under the table when there were any."""
    if not statistics:
        return "no model versions serving"
    rows = [[cell(s) for _, cell in _STATS_COLUMNS] for s in statistics]
    headers = [header for header, _ in _STATS_COLUMNS]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            c.ljust(w) if h in _TEXT_COLUMNS else c.rjust(w)
            for h, c, w in zip(headers, cells, widths, strict=True)
        )
        return "  ".join(aligned).rstrip()

    lines = [line(headers), *(line(r) for r in rows)]
    for s in statistics:
        if s.rejected or s.expired:
            lines.append(
                f"{s.model} version {s.version}: {s.rejected} rejected (queue full), "
                f"{s.expired} expired (deadline passed in the queue)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------- commands


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
    kind = _output_kind(path)
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
        if not _npy_keeps(arr.dtype):
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
