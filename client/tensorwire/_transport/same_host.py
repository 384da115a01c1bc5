"""Same-host transfers, the client's side (the format: tensorwire/wire/dataport.py):
when a ticket names the server's abstract Unix socket and it answers here, payloads
move through shared memory the client makes, passes and takes back itself.

A segment is a memfd, sealed against shrinking and growing: it has no name (nothing
to guess, nothing left behind in /dev/shm: the kernel frees it with its last
descriptor or mapping, whether the client closes, crashes or is killed). The client
copies each request payload into an input segment; the server copies it into memory
of its own (the kernel's copy: nothing the client writes later reaches it). The
response's payloads are written by the server into output segments that the result
arrays are views of. Segments are pooled: a reused one costs a plain memcpy where
fresh pages cost twice that (docs/performance.md). An input segment goes back to the
pool when the server's answer says it does not hold it (this server never does; one
before issue 35 mapped inputs in place and might); an output segment when its result
array is gone.

The call's deadline bounds every wait on the connection: one that runs out raises
DeadlineExceededError, as gRPC would, not a retriable UnavailableError.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from tensorwire._transport.connections import CONNECT_SECONDS, Detours, IdleConnections
from tensorwire.errors import DeadlineExceededError, UnavailableError
from tensorwire.wire import dataport
from tensorwire.wire.dataport import (
    ACCEPTED,
    MAX_SEGMENTS,
    OUTPUTS_MAGIC,
    REQUEST,
    RESPONSE,
    RESPONSE_MAGIC,
    SHARED_MAGIC,
)
from tensorwire.wire.streaming import Advance, StreamReceiver, allocate_host

if sys.platform == "linux":
    import fcntl

#: Whether this platform can make same-host transfers (Linux: memfds with seals,
#: abstract Unix sockets); elsewhere the client imports and uses the network.
SUPPORTED: Final = (
    sys.platform == "linux"
    and hasattr(os, "memfd_create")
    and hasattr(fcntl, "F_ADD_SEALS")
    and hasattr(socket, "SOCK_SEQPACKET")
)
#: Idle segment bytes a client keeps for reuse; beyond it the oldest are freed.
POOL_BYTES: Final = 2 << 30


class Segment:
    """One memfd of a fixed size, mapped in this process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("tensorwire", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # Closed by ``close``, or when the segment is dropped unclosed (a transfer whose
        # caller went away mid-way): never twice, so never someone else's descriptor.
        self._release = weakref.finalize(self, os.close, self.fd)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.mapped = mmap.mmap(self.fd, size)
        except BaseException:
            self._release()
            raise
        #: Whether its pages exist yet (see ``write``).
        self.written = False
        #: Whether it may be used again: not after a transfer that failed with it.
        self.reusable = True

    def write(self, piece: memoryview, offset: int) -> None:
        """``piece`` (bytes) at ``offset``: through the mapping once the pages exist (a
        plain memcpy), else with ``write_at``."""
        if self.written:
            target = np.frombuffer(self.mapped, np.uint8, piece.nbytes, offset)
            np.copyto(target, np.frombuffer(piece, np.uint8))
        else:
            dataport.write_at(self.fd, piece, offset)

    def close(self) -> None:
        """Free it here (a mapping still exported by an array stays until it goes)."""
        with contextlib.suppress(BufferError):
            self.mapped.close()
        with contextlib.suppress(OSError):
            self._release()


class SegmentPool:
    """A client's segments: idle ones by size, up to POOL_BYTES."""

    def __init__(self, idle_bytes: int = POOL_BYTES) -> None:
        self.idle_bytes = idle_bytes
        self._idle: dict[int, list[Segment]] = {}
        self._order: list[Segment] = []  # idle ones, oldest first
        self._held = 0
        self._lock = threading.Lock()
        self._closed = False

    def take(self, nbytes: int) -> Segment:
        """A segment of at least ``nbytes``: the idle one of the same (page-rounded)
        size that has waited longest, else a new one. Oldest first keeps each segment
        in one role (a call's input goes where the last call's input went, its output
        where the last output went), so both sides find it mapped as they left it."""
        size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                segment = idle.pop(0)
                self._order.remove(segment)
                self._held -= size
                return segment
        return Segment(size)

    def give(self, segment: Segment) -> None:
        """Keep ``segment`` for reuse (nothing may write to it but the next taker)."""
        with self._lock:
            if not self._closed and segment.reusable and segment.size <= self.idle_bytes:
                self._idle.setdefault(segment.size, []).append(segment)
                self._order.append(segment)
                self._held += segment.size
                freed = []
                while self._held > self.idle_bytes:
                    oldest = self._order.pop(0)
                    self._idle[oldest.size].remove(oldest)
                    self._held -= oldest.size
                    freed.append(oldest)
            else:
                freed = [segment]
        for old in freed:
            old.close()

    def array(self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """An array over ``segment``'s mapping; the segment comes back to the pool
        once the array and every view of it are gone."""
        count = int(np.prod(shape, dtype=np.int64))
        flat = np.frombuffer(segment.mapped, dtype, count)
        # Every view of ``flat`` has it as its base (numpy stops there: its own base
        # is a memoryview), so it lives exactly as long as the last of them.
        weakref.finalize(flat, self.give, segment)
        return flat.reshape(shape)

    def close(self) -> None:
        """Free every idle segment; those still under result arrays go with them."""
        with self._lock:
            self._closed = True
            idle = self._order
            self._order, self._idle, self._held = [], {}, 0
        for segment in idle:
            segment.close()


class SameHost:
    """A client's same-host connections, per server socket, and its segments."""

    def __init__(self) -> None:
        self.pool = SegmentPool()
        #: Idle connections, by server socket name.
        self.idle: IdleConnections[str] = IdleConnections()
        #: Server sockets that did not answer from here, or refused a ticket, and
        #: until when to use the data port (or chunks) instead.
        self.detours: Detours[str] = Detours()

    def usable(self, name: str) -> bool:
        """Whether to try the server's socket ``name`` now."""
        return SUPPORTED and not self.idle.closed and self.detours.open(name)

    def send(
        self,
        name: str,
        ticket: bytes,
        payloads: Sequence[memoryview],
        receiver: StreamReceiver[Any],
        timeout: float | None,
        chunk_size: int,
        upload: Advance | None,
    ) -> LocalCarrier | None:
        """Copy ``payloads`` into input segments (``upload`` hears of every
        ``chunk_size`` bytes) and present them with ``ticket`` on server socket
        ``name``; the carrier of the transfer, or None when the socket does not answer
        here (another host, another network namespace, a server gone) or refused the
        ticket (busy; or a segment it would not take, which the call's status tells):
        the data port may try the ticket, else chunks go through gRPC."""
        given = [p.cast("B") for p in payloads if p.nbytes]
        if len(given) > MAX_SEGMENTS:
            return None
        inputs: list[Segment] = []
        try:
            for payload in given:
                inputs.append(self.pool.take(payload.nbytes))
            _copy(given, inputs, chunk_size, upload)
            sock = self._accepted(name, ticket, [s.fd for s in inputs], timeout)
        except BaseException:
            _drop(inputs)
            raise
        if sock is None:
            for segment in inputs:
                self.pool.give(segment)  # never passed: still the client's alone
            return None
        carrier = LocalCarrier(self, name, sock, inputs)
        receiver.allocate = carrier.allocate
        return carrier

    def _accepted(
        self, name: str, ticket: bytes, fds: list[int], timeout: float | None
    ) -> socket.socket | None:
        """A connection on which the server accepted the ticket and read ``fds``;
        DeadlineExceededError when the call's deadline passed while it read them."""
        message = REQUEST.pack(SHARED_MAGIC, ticket)
        deadline = _deadline(timeout)
        while True:
            sock = self.idle.take(name)
            reused = sock is not None
            if sock is None:
                try:
                    sock = _connect(name)
                except (ConnectionRefusedError, FileNotFoundError):
                    self.detours.unreachable(name)  # nothing listens there from here
                    return None
                except OSError:
                    break  # its backlog is full: busy
            sent = False
            try:
                sock.settimeout(timeout)
                socket.send_fds(sock, [message], fds)
                sent = True
                if sock.recv(len(ACCEPTED)) == ACCEPTED:
                    self.detours.accepted(name)
                    return sock
            except OSError as exc:
                if sent and _late(exc, deadline):
                    sock.close()
                    raise DeadlineExceededError(
                        "the deadline passed while the server read the shared memory"
                    ) from None
            sock.close()
            if not reused:
                break
            # else the server had closed it (idle, or to make room): a fresh one
        # A fresh connection closed before the server accepted the ticket: it was busy
        # (it closed the connection to make room, or refused it), or refused a segment,
        # and then the call's status says why once chunks come instead.
        self.detours.refused(name)
        return None

    def close(self) -> None:
        """Close every pooled connection and free every idle segment."""
        self.idle.close()
        self.pool.close()


class LocalCarrier:
    """One same-host transfer after its inputs were accepted: it allocates the
    response in output segments and has the server write them."""

    def __init__(self, link: SameHost, name: str, sock: socket.socket, inputs: list[Segment]):
        self.link = link
        self.name = name
        self.sock = sock
        self.inputs = inputs
        #: Per response tensor allocated, its segment (None: empty, on the heap).
        self.outputs: list[Segment | None] = []

    def allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> np.ndarray:
        """A response tensor's array: in an output segment, or (empty) on the heap."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not nbytes:
            self.outputs.append(None)
            return allocate_host(dtype, shape, name)
        segment = self.link.pool.take(nbytes)
        self.outputs.append(segment)
        return self.link.pool.array(segment, dtype, shape)

    def receive(self, receiver: StreamReceiver[Any], timeout: float | None) -> None:
        """Have the server write the response (its header taken: its arrays are in
        the output segments); the input segments go back to the pool unless the
        server still maps them."""
        segments = [self.outputs[k] for k, view in receiver.payloads if view.nbytes]
        deadline = _deadline(timeout)
        try:
            self.sock.settimeout(timeout)
            fds = [s.fd for s in segments if s is not None]
            for start in range(0, max(len(fds), 1), MAX_SEGMENTS):
                socket.send_fds(self.sock, [OUTPUTS_MAGIC], fds[start : start + MAX_SEGMENTS])
            reply = self.sock.recv(RESPONSE.size + len(self.inputs))
        except OSError as exc:
            self.discard()
            if _late(exc, deadline):
                raise DeadlineExceededError(
                    "the deadline passed while the server wrote the response into shared memory"
                ) from None
            raise UnavailableError(f"the same-host connection broke: {exc}") from None
        if len(reply) != RESPONSE.size + len(self.inputs):
            self.discard()
            if _late(None, deadline):  # the server gave up on the call at its deadline
                raise DeadlineExceededError(
                    "the deadline passed while the server wrote the response into shared memory"
                )
            raise UnavailableError("the same-host connection broke")
        magic, size = RESPONSE.unpack(reply[: RESPONSE.size])
        if magic != RESPONSE_MAGIC or size != receiver.total:
            self.discard()
            raise dataport.DataPortError(
                f"the server wrote {size} bytes where the response declares {receiver.total}"
            )
        for segment, held in zip(self.inputs, reply[RESPONSE.size :], strict=True):
            if held:
                segment.close()  # the server's pages now: never written again
            else:
                self.link.pool.give(segment)
        for output in segments:
            if output is not None:
                output.written = True  # back to the pool with its result array
        self.inputs = []
        self.outputs = []
        receiver.filled()
        self.link.idle.give(self.name, self.sock)

    def discard(self) -> None:
        """The transfer failed: the server may still be reading or writing any of its
        segments, so none is reused."""
        self.sock.close()
        _drop(self.inputs)
        for segment in self.outputs:
            if segment is not None:
                segment.reusable = False  # freed with its array
        self.inputs = []
        self.outputs = []


def _connect(name: str) -> socket.socket:
    """A new connection to server socket ``name``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(CONNECT_SECONDS)
        sock.connect("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock


def _copy(
    payloads: list[memoryview], segments: list[Segment], chunk_size: int, upload: Advance | None
) -> None:
    """Each payload into its segment: whole, or ``chunk_size`` bytes at a time for
    ``upload`` to hear of."""
    total = sum(p.nbytes for p in payloads)
    done = 0
    if upload is not None:
        upload(0, total)
    step = total if upload is None else chunk_size
    for payload, segment in zip(payloads, segments, strict=True):
        for start in range(0, payload.nbytes, step):
            piece = payload[start : start + step]
            segment.write(piece, start)
            done += piece.nbytes
            if upload is not None:
                upload(done, total)
        segment.written = True


def _deadline(timeout: float | None) -> float | None:
    """When a wait of ``timeout`` seconds from now ends (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


def _late(exc: OSError | None, deadline: float | None) -> bool:
    """Whether a wait that failed with ``exc`` (None: the server closed) failed
    because the call's deadline passed: its own timeout, or the server closing on
    a call it ended at the deadline."""
    if isinstance(exc, TimeoutError):
        return True
    return deadline is not None and time.monotonic() >= deadline


def _drop(segments: list[Segment]) -> None:
    for segment in segments:
        segment.close()
