"""Same-host transfers, the server's side: shared-memory segments a client on this host
passes over the data plane's Unix socket (the format: tensorwire/wire/dataplane.py).

A segment is only ever a file descriptor the client sent, never a name: nothing
another process can guess or reach. Before a byte of one is mapped, it must be a
memfd sealed against shrinking (so no mapping of it can fault past its end: SIGBUS
cannot reach the server however the client treats it) and at least its payload's
size. Inputs are mapped copy-on-write: a request's tensors read the client's pages in
place, and an operation that writes to them gets pages of its own, never touching
the client's. Outputs are written into the client's segments and unmapped at once.
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
from collections.abc import Iterator, Sequence
from typing import Final

import numpy as np

from tensorwire.errors import InvalidArgumentError

#: Whether this platform can serve same-host transfers: Linux's abstract Unix
#: sockets, SOCK_SEQPACKET and file seals.
SUPPORTED: Final = (
    sys.platform == "linux" and hasattr(socket, "SOCK_SEQPACKET") and hasattr(fcntl, "F_GET_SEALS")
)


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


def check(fd: int, nbytes: int, what: str) -> None:
    """Refuse a descriptor that could fault or reach outside its payload when mapped."""
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


def map_inputs(
    fds: Sequence[int], payloads: Sequence[memoryview]
) -> tuple[list[memoryview], list[weakref.ref[mmap.mmap]]]:
    """The request's non-empty ``payloads`` (the buffers allocated from its header),
    read in place: for each, a writable copy-on-write view of its segment; and a
    weak reference to each mapping, alive as long as anything holds the pages."""
    wanted = [p.nbytes for p in payloads if p.nbytes]
    if len(fds) != len(wanted):
        raise InvalidArgumentError(
            f"shared memory: {len(fds)} segments for a request of {len(wanted)} payloads"
        )
    views: list[memoryview] = []
    held: list[weakref.ref[mmap.mmap]] = []
    for k, (fd, nbytes) in enumerate(zip(fds, wanted, strict=True)):
        check(fd, nbytes, f"shared memory: input segment {k}")
        mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE)
        held.append(weakref.ref(mapped))
        views.append(memoryview(mapped))
    return views, held


def write_outputs(fds: Sequence[int], payloads: Sequence[memoryview]) -> int:
    """Write the response's non-empty ``payloads`` into the client's segments; the
    bytes written."""
    given = [p for p in payloads if p.nbytes]
    if len(fds) != len(given):
        raise InvalidArgumentError(
            f"shared memory: {len(fds)} segments for a response of {len(given)} payloads"
        )
    for k, (fd, payload) in enumerate(zip(fds, given, strict=True)):
        check(fd, payload.nbytes, f"shared memory: output segment {k}")
        write(fd, payload)
    return sum(p.nbytes for p in given)


def write(fd: int, payload: memoryview) -> None:
    """``payload`` into segment ``fd`` from offset 0, the faster way for its state:
    pages the segment already has are written through a mapping (a plain memcpy);
    a fresh segment's pages are made by the kernel as it writes (faulting them in
    through a mapping costs twice as much)."""
    if os.fstat(fd).st_blocks * 512 < payload.nbytes:
        done = 0
        while done < payload.nbytes:
            done += os.pwritev(fd, [payload.cast("B")[done:]], done)
        return
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with mmap.mmap(fd, payload.nbytes, flags=flags) as mapped:
        target = np.frombuffer(mapped, np.uint8)
        np.copyto(target, np.frombuffer(payload.cast("B"), np.uint8))
        del target  # the mapping closes only once nothing exports it


def held(mappings: Sequence[weakref.ref[mmap.mmap]]) -> bytes:
    """One byte per input segment: 1 while something on the server still maps it."""
    return bytes(int(ref() is not None) for ref in mappings)
