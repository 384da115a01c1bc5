"""System shared-memory regions (Triton's extension of the v2 protocol): POSIX
shared-memory objects that clients on this host register by key, each region owned by
the caller that registered it.

A client can shrink its object at any moment, and a load or store past its new end
through a mapping would raise SIGBUS in the server. So every byte moves by kernel copy
(``copies.Copies``): inputs are read into the server's own memory, which the model then
takes in place (a model writing to its input changes nothing of the client's), and
outputs are written into the region. A copy the shrink cuts short fails its request
with FAILED_PRECONDITION; the server goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Final

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    shown,
)
from tensorwire_server.regions.copies import Copies, Window
from tensorwire_server.regions.table import Placement, RegionTable

log = logging.getLogger(__name__)

#: Where Linux keeps POSIX shared-memory objects: shm_open("/name") opens /dev/shm/name.
SHM_DIR: Final = "/dev/shm"
#: The longest object name after the slash (NAME_MAX).
MAX_KEY_BYTES: Final = 255


@dataclass(frozen=True)
class RegionStatus:
    """One registered region, as SystemSharedMemoryStatus describes it."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(eq=False)
class _Region:
    noun: ClassVar[str] = "system shared-memory"
    status: RegionStatus
    fd: int
    writable: bool
    #: The region mapped for the kernel to write outputs through (None: read-only to
    #: the server, or no mapping could be made; pwritev then).
    window: Window | None

    def release(self) -> None:
        # Copies in flight read their own duplicate of the descriptor, and finish.
        os.close(self.fd)


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


class SharedMemory:
    """Every caller's system shared-memory regions, each an open file descriptor, in
    the ``table`` they share with CUDA regions; ``copies`` (the server's) moves their
    bytes."""

    def __init__(self, table: RegionTable, copies: Copies) -> None:
        self.table = table
        self.copies = copies

    @property
    def enabled(self) -> bool:
        """Whether system shared memory is on (the server's flag)."""
        return self.table.enabled

    def _on(self) -> None:
        self.table.on()

    def register(self, owner: str, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open ``key``'s object and register ``byte_size`` bytes of it from ``offset``
        as ``owner``'s region ``name``, after checking the key, the file and the
        range; nothing is read. A writable region is mapped for outputs (its window)."""
        self._on()
        path = os.path.join(SHM_DIR, check_key(key))
        self.table.reserve(owner, name, byte_size)  # before opening anything
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
            window = _window(fd, offset, byte_size, name) if writable else None
            status = RegionStatus(name, key, offset, byte_size)
            self.table.add(owner, _Region(status, fd, writable, window))
        except BaseException:
            os.close(fd)
            raise

    def status(self, owner: str, name: str) -> list[RegionStatus]:
        """``owner``'s regions (empty ``name``: all, by name); NOT_FOUND for a name
        ``owner`` has not registered, whoever else has."""
        self._on()
        return [region.status for region in self.table.listed(_Region, owner, name)]

    def unregister(self, owner: str, name: str) -> None:
        """Forget ``owner``'s region ``name`` (empty: all of them); an unknown name is
        no error (as in Triton)."""
        self._on()
        self.table.unregister(_Region, owner, name)

    def has(self, owner: str, name: str) -> bool:
        """Whether ``owner`` registered a system region called ``name``."""
        return self.table.has(_Region, owner, name)

    def count(self) -> int:
        """System regions registered, by every caller."""
        return self.table.count(_Region)

    def check(self, owner: str, place: Placement, what: str, write: bool = False) -> None:
        """Refuse, before any work, a placement in an unknown region, past the
        region's end, or (``write``) in a region the server may only read."""
        self._on()
        with self.table.lock:
            self._placed_for(owner, place, what, write)

    def read(self, owner: str, place: Placement, what: str) -> memoryview:
        """A copy of the placement's bytes in fresh memory of the server's."""
        with self._using(owner, place, what, write=False) as (_, fd, start):
            _fits(fd, start + place.byte_size, place.region, what)
            out = self.copies.buffer(place.byte_size)
            if not self.copies.read(fd, start, out):
                raise _shrunk_while(what, place.region, "read")
            return out

    def write(self, owner: str, place: Placement, data: memoryview, what: str) -> None:
        """Write ``data`` (at most the placement's byte size) at the placement."""
        if data.nbytes > place.byte_size:
            raise InvalidArgumentError(
                f"{what} is {data.nbytes} bytes, more than its shared_memory_byte_size "
                f"({place.byte_size})"
            )
        with self._using(owner, place, what, write=True) as (region, fd, start):
            # A pwrite past the end would grow the object: refuse to, so a shrunk
            # object stays the size its client made it (a shrink racing this check
            # grows it back by at most what this write covers, and only on pwritev:
            # the kernel's writes through a window stop at the end).
            _fits(fd, start + data.nbytes, place.region, what)
            if not data.nbytes:
                return
            if not self.copies.write(fd, start, data, region.window):
                raise _shrunk_while(what, place.region, "written")

    @contextmanager
    def _using(
        self, owner: str, place: Placement, what: str, write: bool
    ) -> Iterator[tuple[_Region, int, int]]:
        """The region, a duplicate of its descriptor, and where the placement starts
        in its object, once ``_placed_for`` accepts the placement."""
        self._on()
        with self.table.lock:
            region = self._placed_for(owner, place, what, write)
            fd = os.dup(region.fd)
        try:
            yield region, fd, region.status.offset + place.offset
        finally:
            os.close(fd)

    def _placed_for(self, owner: str, place: Placement, what: str, write: bool) -> _Region:
        """The table's ``placed``, and (``write``) a region the server may write (under
        the lock)."""
        region = self.table.placed(_Region, owner, place, what)
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


def _window(fd: int, offset: int, length: int, name: str) -> Window | None:
    """A window for the kernel to write the region's outputs through; None where none
    can be mapped (out of address space or of mappings, or no Linux), and pwritev
    writes instead."""
    try:
        return Window(fd, offset, length)
    except OSError as exc:
        log.info("region %s: no window (%s); writes use pwritev", shown(name), exc)
        return None


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
