"""Same-host transfers, the server's side: shared-memory segments a client on this host
passes over the data plane's Unix socket (the format: tensorwire/wire/dataplane.py).

A segment is only ever a file descriptor the client sent, never a name: nothing
another process can guess or reach. Before a byte of one is mapped, it must be a
memfd sealed against shrinking (so no mapping of it can fault past its end: SIGBUS
cannot reach the server however the client treats it) and at least its payload's
size. Inputs are mapped shared, not copy-on-write (the connection keeps one mapping
per segment, whatever role the segment plays next): a request's tensors read the
client's pages in place, and an operation that writes to them writes to the client's
copy of its own input, nothing else. Outputs are written into the client's segments.
A connection keeps its mappings for the next transfer, which usually reuses the same
segments.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import socket
import stat
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Final

import numpy as np

from tensorwire.errors import InvalidArgumentError
from tensorwire.wire.dataplane import write_at

#: Whether this platform can serve same-host transfers: Linux's abstract Unix
#: sockets, SOCK_SEQPACKET and file seals.
SUPPORTED: Final = (
    sys.platform == "linux" and hasattr(socket, "SOCK_SEQPACKET") and hasattr(fcntl, "F_GET_SEALS")
)


#: Bytes of its client's segments a same-host connection keeps mapped between
#: transfers (the client keeps up to 2 GiB of idle segments for reuse).
KEPT_BYTES: Final = 2 << 30


def listen(backlog: int) -> tuple[socket.socket, str]:
    """A listening abstract Unix socket with a random name, and the name: it exists
    only in this network namespace, on this host, and only as long as the server."""
    name = f"tensorwire-data-{secrets.token_hex(16)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind("\0" + name)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, name


@contextlib.contextmanager
def closing(fds: Sequence[int]) -> Iterator[None]:
    """Close every descriptor received, whatever happens: a mapping outlives its fd."""
    try:
        yield
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def check(fd: int, nbytes: int, what: str) -> os.stat_result:
    """Refuse a descriptor that could fault or reach outside its payload when mapped;
    its status."""
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise InvalidArgumentError(
            f"{what}: not a memfd (shared memory segments are sealable memfds)"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgumentError(f"{what}: not a memfd")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise InvalidArgumentError(
            f"{what}: not sealed against shrinking (F_SEAL_SHRINK); a segment that "
            "can shrink could fault the mapping that reads it"
        )
    if info.st_size < nbytes:
        raise InvalidArgumentError(
            f"{what}: {info.st_size} bytes, too small for its {nbytes}-byte payload"
        )
    return info


class Mappings:
    """One same-host connection's mappings of its client's segments, kept from one
    transfer to the next: the client reuses its segments, and a mapping kept is one
    whose pages are not faulted in again (on the 2-core machine that is 10 ms per
    256 MiB, each way). Shared mappings: a model that writes to its input writes to
    the client's copy of it, which the client overwrites before its next use (and
    never uses again when the server keeps it). Only the last transfer's segments are
    kept (the ones the client most likely still pools: a segment it let go of is not
    held alive here for long), at most ``limit`` bytes; all go with the connection."""

    def __init__(self, limit: int = KEPT_BYTES) -> None:
        self.limit = limit
        self._kept: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()
        self._bytes = 0
        self._used: set[tuple[int, int]] = set()

    def map(self, fd: int, info: os.stat_result) -> mmap.mmap:
        """A mapping of all of segment ``fd`` (``info``: what ``check`` found)."""
        key = (info.st_dev, info.st_ino)
        self._used.add(key)
        mapped = self._kept.get(key)
        if mapped is not None and len(mapped) == info.st_size:
            self._kept.move_to_end(key)
            return mapped
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(fd, info.st_size, flags=flags)
        if info.st_size <= self.limit:
            self._forget(key)
            self._kept[key] = mapped
            self._bytes += len(mapped)
            while self._bytes > self.limit:
                self._forget(next(iter(self._kept)))
        return mapped

    def _forget(self, key: tuple[int, int]) -> None:
        # Not closed: a tensor still on it keeps it (it unmaps once nothing exports it).
        old = self._kept.pop(key, None)
        if old is not None:
            self._bytes -= len(old)

    def settle(self) -> None:
        """A transfer ended: let go of the mappings it did not use."""
        for key in [k for k in self._kept if k not in self._used]:
            self._forget(key)
        self._used.clear()


def map_inputs(
    fds: Sequence[int], payloads: Sequence[memoryview], mappings: Mappings
) -> tuple[list[memoryview], list[weakref.ref[np.ndarray]]]:
    """The request's non-empty ``payloads`` (the buffers allocated from its header),
    read in place: for each, a writable view of its segment; and a weak reference
    that lives as long as anything of the request holds the view (every view of it
    has the same base array, which only the request's buffers reach)."""
    views: list[memoryview] = []
    held: list[weakref.ref[np.ndarray]] = []
    for k, (fd, payload) in enumerate(_paired(fds, payloads, "request")):
        info = check(fd, payload.nbytes, f"shared memory: input segment {k}")
        base = np.frombuffer(mappings.map(fd, info), np.uint8, payload.nbytes)
        held.append(weakref.ref(base))
        views.append(memoryview(base))  # type: ignore[arg-type]
    return views, held


def write_outputs(fds: Sequence[int], payloads: Sequence[memoryview], mappings: Mappings) -> int:
    """Write the response's non-empty ``payloads`` into the client's segments; the
    bytes written."""
    written = 0
    for k, (fd, payload) in enumerate(_paired(fds, payloads, "response")):
        info = check(fd, payload.nbytes, f"shared memory: output segment {k}")
        data = payload.cast("B")
        if info.st_blocks * 512 < data.nbytes:  # a fresh segment
            write_at(fd, data, 0)
        else:
            target = np.frombuffer(mappings.map(fd, info), np.uint8, data.nbytes)
            np.copyto(target, np.frombuffer(data, np.uint8))
        written += data.nbytes
    return written


def _paired(
    fds: Sequence[int], payloads: Sequence[memoryview], what: str
) -> list[tuple[int, memoryview]]:
    """Each segment with its non-empty payload; INVALID_ARGUMENT unless one each."""
    given = [p for p in payloads if p.nbytes]
    if len(fds) != len(given):
        raise InvalidArgumentError(
            f"shared memory: {len(fds)} segments for a {what} of {len(given)} payloads"
        )
    return list(zip(fds, given, strict=True))


def held(mappings: Sequence[weakref.ref[np.ndarray]]) -> bytes:
    """One byte per input segment: 1 while something on the server still maps it."""
    return bytes(int(ref() is not None) for ref in mappings)
