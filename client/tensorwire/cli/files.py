"""The tensorwire command's files: .npy and .npz inputs read without unpickling, and
outputs written atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO, Final

import numpy as np

from tensorwire.wire.dtypes import NAMES, wire_dtype

_NPY_MAGIC: Final = b"\x93NUMPY"
_ZIP_MAGIC: Final = b"PK\x03\x04"


class UsageError(Exception):
    """A problem with the command line or its files: exit status 2."""


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


def output_kind(path: Path) -> str:
    """The kind of output file ``path`` names (".npy" or ".npz"), once it is known to be
    one that can be written."""
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


def npy_keeps(dtype: np.dtype) -> bool:
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
