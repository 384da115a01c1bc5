"""Same-host transfers, the server's side: shared-memory segments a client on this host
passes over the data port's Unix socket (the format: tensorwire/wire/dataport.py).

A segment is only ever a file descriptor the client sent, never a name: nothing
another process can guess or reach. It must be a memfd sealed against shrinking and at
least its payload's size. The client keeps a writable mapping of it all along, so
nothing here ever reads or writes one with the server's own instructions, and no
kernel ever sees its pages (a kernel that checks its indices and then uses them would
use what the client wrote in between; issue 35). Every byte moves by a kernel copy
(the server's regions.copies.Copies, as for Triton's regions):

- Inputs are ``preadv``'d into memory of the server's own (warm huge-page buffers for
  large ones, on several threads), which the request's tensors then are: what the
  client writes later reaches nothing, and a kept tensor owns its memory.
- Outputs are written with ``pwritev`` into a segment whose pages do not exist yet,
  else with ``process_vm_writev`` through a *window* (a shared mapping of the
  payload's bytes, never dereferenced here), which the connection keeps for the
  next transfer (the client reuses its segments; a window kept has its pages
  mapped already) and unmaps the moment it ends.

No more of a segment than its payload is ever read, mapped or written, however
large (or sparse) the memfd.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError
from tensorwire.wire.dataport import MAX_SEGMENTS, OUTPUTS_MAGIC
from tensorwire.wire.streaming import StreamReceiver
from tensorwire_server.regions.copies import Copies, Window

#: Whether this platform can serve same-host transfers: Linux's abstract Unix
#: sockets, SOCK_SEQPACKET and file seals.
SUPPORTED: Final = (
    sys.platform == "linux" and hasattr(socket, "SOCK_SEQPACKET") and hasattr(fcntl, "F_GET_SEALS")
)


#: Bytes of its client's output segments a same-host connection keeps windows on
#: between transfers (the client keeps up to 2 GiB of idle segments for reuse).
KEPT_BYTES: Final = 2 << 30
#: Seals that forbid writing (F_SEAL_FUTURE_WRITE: Linux 5.1, Python 3.13's fcntl).
_NO_WRITES: Final = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
#: Bytes a copy into staging buffers takes at a time: a staging copy to the GPU
#: starts while the rest is still read.
READ_BYTES: Final = 8 << 20


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
    """Close every descriptor received, whatever happens."""
    try:
        yield
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def check(fd: int, nbytes: int, what: str, writing: bool = False) -> os.stat_result:
    """Refuse a descriptor that is not a sealed memfd of at least ``nbytes``, or
    (``writing``) that is sealed against writes; its status."""
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
    if writing and seals & _NO_WRITES:
        raise InvalidArgumentError(
            f"{what}: sealed against writing (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE); the "
            "server writes the response into it"
        )
    return info


class Mappings:
    """One same-host connection's windows on its client's output segments, kept from
    one transfer to the next: the client reuses its segments, and a window kept is one
    whose pages are not faulted in again (on the 2-core machine that is 10 ms per
    256 MiB). Only the last transfer's are kept (the ones the client most likely still
    pools), at most ``limit`` bytes; ``close`` unmaps all of them, when the connection
    ends, whatever ended it."""

    def __init__(self, limit: int = KEPT_BYTES) -> None:
        self.limit = limit
        self._kept: OrderedDict[tuple[int, int], Window] = OrderedDict()
        self._bytes = 0
        self._used: set[tuple[int, int]] = set()

    def window(self, fd: int, info: os.stat_result, nbytes: int) -> Window | None:
        """A window on the first ``nbytes`` of segment ``fd`` (``info``: what ``check``
        found); None when none can be mapped (pwritev then)."""
        key = (info.st_dev, info.st_ino)
        self._used.add(key)
        kept = self._kept.get(key)
        if kept is not None and kept.length >= nbytes:
            self._kept.move_to_end(key)
            return kept
        try:
            window = Window(fd, 0, nbytes)
        except OSError:
            return None
        self._forget(key)
        if nbytes <= self.limit:
            self._kept[key] = window
            self._bytes += nbytes
            while self._bytes > self.limit:
                self._forget(next(iter(self._kept)))
        return window

    def _forget(self, key: tuple[int, int]) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            self._bytes -= old.length
            old.close()  # no write is under way: this connection's thread makes them

    def settle(self) -> None:
        """A transfer ended: unmap the windows it did not use."""
        for key in [k for k in self._kept if k not in self._used]:
            self._forget(key)
        self._used.clear()

    def close(self) -> None:
        """The connection ended: unmap every window at once."""
        for key in list(self._kept):
            self._forget(key)
        self._used.clear()


def read_inputs(
    fds: Sequence[int], payloads: Sequence[memoryview], copies: Copies
) -> list[memoryview]:
    """The request's non-empty ``payloads`` (the buffers allocated from its header),
    each read from its segment by ``copies`` (the server's) into a buffer of the
    server's own (its warm ones when large): the request's tensors, which nothing of
    the client's reaches."""
    buffers: list[memoryview] = []
    for k, (fd, payload) in enumerate(_paired(fds, payloads, "request")):
        what = f"shared memory: input segment {k}"
        check(fd, payload.nbytes, what)
        copy = copies.buffer(payload.nbytes)
        _read(copies, fd, 0, copy, what)
        buffers.append(copy)
    return buffers


def reader(
    fds: Sequence[int], payloads: Sequence[memoryview], copies: Copies
) -> Callable[[memoryview], int]:
    """A ``recv_into`` that reads the request's segments back to back, by ``copies``,
    into the buffers it is given (staging buffers, on their way to a GPU), READ_BYTES
    at a time; every segment is checked first."""
    pending = [
        (fd, payload.nbytes, f"shared memory: input segment {k}")
        for k, (fd, payload) in enumerate(_paired(fds, payloads, "request"))
    ]
    for fd, nbytes, what in pending:
        check(fd, nbytes, what)
    sources = iter(pending)
    current = next(sources, None)
    offset = 0

    def read_into(target: memoryview) -> int:
        nonlocal current, offset
        while current is not None and offset == current[1]:
            current, offset = next(sources, None), 0
        if current is None:
            return 0
        fd, nbytes, what = current
        n = min(target.nbytes, nbytes - offset, READ_BYTES)
        _read(copies, fd, offset, target[:n], what)
        offset += n
        return n

    return read_into


def _read(copies: Copies, fd: int, start: int, out: memoryview, what: str) -> None:
    """Fill ``out`` from segment ``fd`` at ``start``; INVALID_ARGUMENT if it cannot be."""
    try:
        whole = copies.read(fd, start, out)
    except OSError as exc:
        raise InvalidArgumentError(f"{what}: cannot be read ({exc.strerror})") from None
    if not whole:  # it cannot shrink (sealed): never, but say so if it does
        raise InvalidArgumentError(f"{what}: ended before its payload")


def write_outputs(
    fds: Sequence[int], payloads: Sequence[memoryview], mappings: Mappings, copies: Copies
) -> int:
    """Write the response's non-empty ``payloads`` into the client's segments, by
    ``copies``; the bytes written."""
    written = 0
    for k, (fd, payload) in enumerate(_paired(fds, payloads, "response")):
        what = f"shared memory: output segment {k}"
        data = payload.cast("B")
        info = check(fd, data.nbytes, what, writing=True)
        # A fresh segment's pages are made by pwritev as it writes (faulting them in
        # through a window costs twice as much); one written before takes a window.
        fresh = info.st_blocks * 512 < data.nbytes
        window = None if fresh else mappings.window(fd, info, data.nbytes)
        try:
            whole = copies.write(fd, 0, data, window)
        except OSError as exc:  # sealed since it was checked, say
            raise InvalidArgumentError(f"{what}: cannot be written ({exc.strerror})") from None
        if not whole:
            raise ResourceExhaustedError(f"{what}: no memory left for its pages")
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


def receive_outputs(sock: socket.socket, wanted: int) -> list[int]:
    """The descriptors of the response's segments: ``wanted`` of them, in as many
    OUTPUTS messages as it takes (each carries MAX_SEGMENTS at most)."""
    fds: list[int] = []
    try:
        while True:
            message, more, flags, _ = socket.recv_fds(sock, len(OUTPUTS_MAGIC), MAX_SEGMENTS)
            fds += more
            if message != OUTPUTS_MAGIC or flags & socket.MSG_CTRUNC:
                raise InvalidArgumentError(
                    "shared memory: the client did not send the response's segments"
                )
            if len(fds) >= wanted:
                return fds
    except BaseException:
        with closing(fds):
            raise


def place(receiver: StreamReceiver[Any], in_place: bool, fds: list[int], copies: Copies) -> None:
    """A request's payloads from the client's segments, each copied by the kernel:
    into buffers of the server's own that replace ``receiver``'s (``in_place``), or
    into those (staged for a GPU)."""
    payloads = [v for _, v in receiver.payloads]
    if in_place:
        receiver.adopt(read_inputs(fds, payloads, copies))
    else:
        receiver.fill(reader(fds, payloads, copies))
