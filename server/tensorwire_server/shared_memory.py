"""System shared-memory regions (Triton's extension of the v2 protocol): POSIX
shared-memory objects that clients on this host register by key, each region owned by
the caller that registered it.

Inputs are mapped copy-on-write for each request and handed to the model in place (a
model writing to its input changes nothing of the client's); outputs are copied through
a mapping of the region kept while it is registered. A client can shrink its object at
any moment, which would make those accesses SIGBUS: ``mapped`` catches that, and the
request the shrink spoiled fails with FAILED_PRECONDITION (see its note). Measured on
the 2-core machine, 256 MiB: a mapping reads 8.3 GiB/s fresh and writes 11 GiB/s, where
``preadv`` into a new array moved 3.4 GiB/s and ``pwritev`` 4.6. Where ``mapped`` is
not supported, those kernel copies, which cannot fault, are used instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    shown,
)
from tensorwire_server import mapped
from tensorwire_server.region_table import Placement, RegionTable

#: Where Linux keeps POSIX shared-memory objects: shm_open("/name") opens /dev/shm/name.
SHM_DIR: Final = "/dev/shm"
#: The longest object name after the slash (NAME_MAX).
MAX_KEY_BYTES: Final = 255
#: Linux moves at most this many bytes per read or write call (0x7ffff000).
_MAX_IO: Final = 0x7FFFF000


@dataclass(frozen=True)
class RegionStatus:
    """One registered region, as SystemSharedMemoryStatus describes it."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(eq=False)
class _Region:
    status: RegionStatus
    fd: int
    writable: bool
    #: The region mapped for writing outputs, once one is written (None again after a
    #: shrink spoiled it).
    outputs: mapped.Mapping | None = None


@dataclass(eq=False)
class Reads:
    """The inputs one request mapped, to check once its answer is made: a shrink while
    the model read them left zeros in their place."""

    mappings: list[tuple[mapped.Mapping, str, str]] = field(default_factory=list)

    def check(self) -> None:
        """FAILED_PRECONDITION if any input's object shrank while it was in use."""
        for mapping, region, what in self.mappings:
            if mapping.shrunk:
                raise _shrunk_while(what, region, "read")


def check_key(key: str) -> str:
    """The object's name under SHM_DIR for ``key`` ("/name"); INVALID_ARGUMENT for any
    key that is not one POSIX shared-memory name, so none reaches outside SHM_DIR."""
    name = key[1:]
    if (
        not key.startswith("/")
        or not name
        or "/" in name
        or "\0" in name
        or name in (".", "..")
        or len(name.encode(errors="surrogatepass")) > MAX_KEY_BYTES
    ):
        raise InvalidArgumentError(
            f"key {shown(key)} is not a POSIX shared-memory name: give '/' and a name of "
            f"1 to {MAX_KEY_BYTES} bytes with no further '/', as shm_open takes it"
        )
    return name


class SharedMemory(RegionTable[_Region]):
    """Every caller's system shared-memory regions, each an open file descriptor."""

    noun = "system shared-memory"

    def register(self, owner: str, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open ``key``'s object and register ``byte_size`` bytes of it from ``offset``
        as ``owner``'s region ``name``, after checking the key, the file and the
        range; nothing is read or mapped."""
        self._on()
        path = os.path.join(SHM_DIR, check_key(key))
        self._reserve(owner, name, byte_size)  # before opening anything
        fd, writable = _open(path, key)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(f"key {shown(key)} is not a shared-memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgumentError(
                    f"region {shown(name)}: offset {offset} + byte_size {byte_size} runs past "
                    f"the end of {shown(key)}, which holds {info.st_size} bytes"
                )
            self._add(owner, _Region(RegionStatus(name, key, offset, byte_size), fd, writable))
        except BaseException:
            os.close(fd)
            raise

    def _release(self, region: _Region) -> None:
        # Copies in flight read their own duplicate of the descriptor, and finish.
        os.close(region.fd)

    def status(self, owner: str, name: str) -> list[RegionStatus]:
        """``owner``'s regions (empty ``name``: all, by name); NOT_FOUND for a name
        ``owner`` has not registered, whoever else has."""
        return [region.status for region in self._listed(owner, name)]

    def check(self, owner: str, place: Placement, what: str, write: bool = False) -> None:
        """Refuse, before any work, a placement in an unknown region, past the
        region's end, or (``write``) in a region the server may only read."""
        with self._lock:
            self._placed_for(owner, place, what, write)

    def read(self, owner: str, reads: Reads, place: Placement, what: str) -> memoryview:
        """The placement's bytes: a copy-on-write mapping, noted in ``reads`` to be
        checked once the request is answered (see the module's note)."""
        with self._using(owner, place, what, write=False) as (_, fd, start):
            _fits(fd, start + place.byte_size, place.region, what)
            if not place.byte_size:
                return memoryview(b"")
            if mapped.SUPPORTED:
                mapping = _map(fd, start, place.byte_size, True, place.region, what)
                reads.mappings.append((mapping, place.region, what))
                return memoryview(mapping.array)  # type: ignore[arg-type]
            # NumPy's allocation: torch.from_numpy takes it without a copy.
            out = memoryview(np.empty(place.byte_size, np.uint8))  # type: ignore[arg-type]
            _copy(os.preadv, fd, out, start, place.region, what)
            return out

    def write(self, owner: str, place: Placement, data: memoryview, what: str) -> None:
        """Write ``data`` (at most the placement's byte size) at the placement."""
        if data.nbytes > place.byte_size:
            raise InvalidArgumentError(
                f"{what} is {data.nbytes} bytes, more than its shared_memory_byte_size "
                f"({place.byte_size})"
            )
        with self._using(owner, place, what, write=True) as (region, fd, start):
            # A pwrite past the end would grow the object, not fault: refuse to, so a
            # shrunk object stays the size its client made it (a shrink racing this
            # check grows it back by at most what this write covers).
            _fits(fd, start + data.nbytes, place.region, what)
            if not mapped.SUPPORTED:
                _copy(os.pwritev, fd, data, start, place.region, what)
                return
            mapping = self._outputs(region, fd)
            at = place.offset
            np.copyto(mapping.array[at : at + data.nbytes], np.frombuffer(data, np.uint8))
            if mapping.shrunk:
                with self._lock:  # the next write maps the object afresh
                    if region.outputs is mapping:
                        region.outputs = None
                raise _shrunk_while(what, place.region, "written")

    def _outputs(self, region: _Region, fd: int) -> mapped.Mapping:
        """The region's mapping for outputs (made on first use and kept while it is
        registered: its pages stay mapped, so later writes do not fault them in)."""
        with self._lock:
            if region.outputs is None:
                status = region.status
                region.outputs = _map(fd, status.offset, status.byte_size, False, status.name, "")
            return region.outputs

    @contextmanager
    def _using(
        self, owner: str, place: Placement, what: str, write: bool
    ) -> Iterator[tuple[_Region, int, int]]:
        """The region, a duplicate of its descriptor, and where the placement starts
        in its object, once ``_placed_for`` accepts the placement."""
        with self._lock:
            region = self._placed_for(owner, place, what, write)
            fd = os.dup(region.fd)
        try:
            yield region, fd, region.status.offset + place.offset
        finally:
            os.close(fd)

    def _placed_for(self, owner: str, place: Placement, what: str, write: bool) -> _Region:
        """``_placed``, and (``write``) a region the server may write (under the lock)."""
        region = self._placed(owner, place, what)
        if write and not region.writable:
            raise FailedPreconditionError(
                f"{what}: region {shown(place.region)} is read-only to the server (its "
                "object is not writable by the server's user)"
            )
        return region


def _open(path: str, key: str) -> tuple[int, bool]:
    """The object's descriptor, read-write if the server may write it, else read-only.
    O_NOFOLLOW: a symbolic link planted under the name is refused, not followed;
    O_NONBLOCK: a FIFO planted there cannot hold the call (fstat then refuses it)."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            return os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            return os.open(path, os.O_RDONLY | flags), False
    except FileNotFoundError:
        raise NotFoundError(
            f"no shared-memory object {shown(key)} on the server's host: create it "
            "(shm_open) before registering it"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgumentError(f"key {shown(key)} is a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise InvalidArgumentError(f"key {shown(key)} is not a shared-memory object") from None
        raise FailedPreconditionError(
            f"the server cannot open shared-memory object {shown(key)}: {exc.strerror}"
        ) from None


def _map(
    fd: int, offset: int, length: int, private: bool, region: str, what: str
) -> mapped.Mapping:
    try:
        return mapped.Mapping(fd, offset, length, private=private)
    except OSError as exc:  # out of address space or of mappings (vm.max_map_count)
        raise ResourceExhaustedError(
            f"{what or 'an output'}: the server cannot map region {shown(region)} now "
            f"({exc.strerror}); try again later"
        ) from None


def _shrunk_while(what: str, region: str, done: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"{what}: the object of region {shown(region)} was shrunk while it was being "
        f"{done} (or /dev/shm ran out of room): register it again at its new size"
    )


def _fits(fd: int, end: int, region: str, what: str) -> None:
    size = os.fstat(fd).st_size
    if size < end:
        raise FailedPreconditionError(
            f"{what}: the object of region {shown(region)} was shrunk to {size} bytes, short "
            f"of the {end} this tensor needs: register it again at its new size"
        )


def _copy(
    move: Callable[[int, list[memoryview], int], int],
    fd: int,
    view: memoryview,
    start: int,
    region: str,
    what: str,
) -> None:
    """Move all of ``view`` with ``move`` (os.preadv or os.pwritev) from ``start``,
    in pieces the kernel takes whole; a short read means the object shrank."""
    view = view.cast("B")
    done = 0
    while done < view.nbytes:
        moved = move(fd, [view[done : done + _MAX_IO]], start + done)
        if moved <= 0:
            raise FailedPreconditionError(
                f"{what}: the object of region {shown(region)} ended after {start + done} "
                "bytes: it was shrunk while being read"
            )
        done += moved
