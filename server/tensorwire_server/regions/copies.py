"""Copies between the server's memory and a client's shared-memory object, all made by
the kernel, so that a client shrinking its object mid-copy cannot fault the server,
and nothing the client writes later reaches what the server read: Triton's system
regions (system.py) and same-host segments (dataport/same_host.py) both copy through
the server's ``Copies``, which keeps its warm buffers and counts its short copies.

A load or store through a mapping of a client's object past its end raises SIGBUS,
which kills the process, and a client can shrink (``ftruncate``) its object at any
moment. So the server never touches a client's pages with its own instructions:

- Reads are ``preadv`` into memory of the server's own: for large inputs, buffers of
  huge pages kept warm between requests (``Copies.buffer``). A read that comes up short
  means the object shrank.
- Writes are ``process_vm_writev`` into this process's own ``MAP_SHARED`` mapping of
  the region (a ``Window``), which nothing here ever dereferences: the kernel pins
  each page and copies, and a page past the object's end ends the copy with EFAULT
  instead of a signal. ``pwritev`` would be as safe, but it holds the file's lock for
  the whole write, so two threads cannot share one copy; it remains the fallback
  where the system call is refused (a seccomp profile) or no window can be mapped.
- Large copies are cut into pieces copied on several threads at once.

Measured on the 2-core machine, 256 MiB: ``preadv`` 4.9 GiB/s on one thread and 9.2
on two (into warm memory; 5.6 into fresh huge pages), ``process_vm_writev`` 4.8 and
8.9, ``pwritev`` 4.2 however many. A tritonclient round trip of 256 MiB through the
server took 104 ms with fresh buffers, 88 with warm ones of huge pages, and 123 with
warm ones of small pages: the page size counts more than the warmth.

An earlier design mapped the objects and caught SIGBUS with a handler written in
Python; it crashed once in CI under a shrinking client, and a server must not, so the
server now copies.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Final

import numpy as np

#: Copies at least this long are cut into pieces of at least this long each.
PIECE: Final = 8 << 20
#: At most this many pieces at once: memory bandwidth is spent by then.
MAX_PIECES: Final = max(1, min(4, os.cpu_count() or 1))
#: Linux moves at most this many bytes per read or write call (0x7ffff000).
_MAX_IO: Final = 0x7FFFF000
#: Buffers at least this long are mappings with huge pages advised, kept for reuse.
_HUGE_FROM: Final = 4 << 20
#: A huge page: kept buffers come in multiples of it.
_HUGE: Final = 2 << 20
#: Idle buffers kept for the next requests, in bytes at most (the oldest go first).
KEEP_IDLE: Final = 1 << 30
_PAGE: Final = mmap.PAGESIZE


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _libc() -> Any:
    lib = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is let go during each call
    vm_io: list[Any] = [
        ctypes.c_int,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    lib.process_vm_writev.argtypes = vm_io
    lib.process_vm_writev.restype = ctypes.c_ssize_t
    lib.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    lib.mmap.restype = ctypes.c_void_p
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


#: Linux's C library (process_vm_writev and mmap); None elsewhere, where writes use
#: pwritev alone.
_LIBC: Final[Any] = _libc() if sys.platform == "linux" else None
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
# The helper threads copying pieces of large copies: the process's, shared by every
# server in it (they hold nothing of any server's, and sharing them bounds them).
_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


class Copies:
    """One server's kernel copies: the large buffers it keeps warm between its
    requests, and the copies a client cut short (a metric). Each server holds its
    own (two servers in one process, as the tests run them, count and keep only
    theirs); Triton's system regions and the data port's same-host path both copy
    through it."""

    def __init__(self, keep: int = KEEP_IDLE) -> None:
        self._warm = _Warm(keep)
        self._short = 0

    def short_copies(self) -> int:
        """Copies cut short since the server started, each because a client shrank its
        object under it (or /dev/shm had no room left): each failed one request."""
        return self._short

    def buffer(self, nbytes: int) -> memoryview:
        """``nbytes`` of writable memory of the server's own, for a read to fill whole
        and a model to take in place (torch.from_numpy needs no copy). Large ones are
        reused (``_Warm``): what they held before is stale, never another request's to
        see, since a read that does not fill a buffer fails its request."""
        if nbytes < _HUGE_FROM:
            return memoryview(np.empty(nbytes, np.uint8))  # type: ignore[arg-type]
        return self._warm.take(nbytes)

    def release_idle(self) -> None:
        """Unmap every buffer kept idle (the server went quiet: resident memory then
        shows what it holds, not what it might reuse)."""
        self._warm.clear()

    def idle_bytes(self) -> int:
        """Bytes of buffers kept idle now (tests)."""
        return self._warm.idle_bytes()

    def read(self, fd: int, start: int, out: memoryview) -> bool:
        """Fill ``out`` from ``fd`` at ``start``; False if the object ended first."""
        out = out.cast("B")
        whole = _in_pieces(out.nbytes, partial(_file_copy, os.preadv, fd, out, start))
        return self._counted(whole)

    def write(self, fd: int, start: int, data: memoryview, window: Window | None) -> bool:
        """Write ``data`` into ``fd`` at ``start``: through ``window`` (a mapping of the
        region that holds ``start``) when there is one and the kernel allows it, else
        with pwritev. False if the object ended first (it shrank, or /dev/shm is full)."""
        data = data.cast("B")
        if window is not None and window.usable:
            try:
                return self._counted(window.write(start, data))
            except OSError:  # process_vm_writev refused (seccomp): never again
                window.usable = False
        # One piece: the file's lock lets one pwritev through at a time anyway.
        return self._counted(_file_copy(os.pwritev, fd, data, start, 0, data.nbytes))

    def _counted(self, complete: bool) -> bool:
        if not complete:
            self._short += 1  # a lost update only undercounts a metric
        return complete


class _Block:
    """An anonymous mapping of ``capacity`` bytes, huge pages advised, and its address
    (held as a ctypes view, which also keeps the mapping from being closed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pages = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.pages.madvise(mmap.MADV_HUGEPAGE)
        self._view = ctypes.c_char.from_buffer(self.pages)
        self.address = ctypes.addressof(self._view)


class _Lease:
    """What one request's arrays over a block are views of: NumPy keeps it as their
    base, and its finalizer hands the block back once no array or tensor uses it."""

    def __init__(self, block: _Block, nbytes: int) -> None:
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (block.address, False),
            "version": 3,
        }


class _Warm:
    """Blocks kept warm between requests: a read into pages already faulted in runs at
    the copy's speed, where fresh ones are zeroed first. At most ``keep`` bytes idle."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._idle: list[_Block] = []  # oldest first
        # Handed back by finalizers, which may run inside any allocation (this class's
        # own, under its lock, included): an append needs no lock; ``take`` sorts them.
        self._returned: deque[_Block] = deque()

    def take(self, nbytes: int) -> memoryview:
        capacity = -(-nbytes // _HUGE) * _HUGE
        block = None
        with self._lock:
            self._settle()
            for i in range(len(self._idle) - 1, -1, -1):  # the newest: the warmest
                if self._idle[i].capacity == capacity:
                    block = self._idle.pop(i)
                    break
        if block is None:
            block = _Block(capacity)
        lease = _Lease(block, nbytes)
        weakref.finalize(lease, self._returned.append, block).atexit = False
        return memoryview(np.asarray(lease))  # type: ignore[arg-type]

    def clear(self) -> None:
        with self._lock:
            self._settle()
            self._idle.clear()

    def idle_bytes(self) -> int:
        """Bytes kept idle now (tests)."""
        with self._lock:
            self._settle()
            return sum(block.capacity for block in self._idle)

    def _settle(self) -> None:
        """Blocks handed back join the idle ones; the oldest go past ``keep``."""
        while self._returned:
            self._idle.append(self._returned.popleft())
        total = sum(block.capacity for block in self._idle)
        while self._idle and total > self.keep:
            total -= self._idle.pop(0).capacity  # unmapped with its last reference


def _file_copy(
    move: Callable[[int, list[memoryview], int], int],
    fd: int,
    view: memoryview,
    start: int,
    at: int,
    length: int,
) -> bool:
    """Move ``view[at:at + length]`` to or from ``fd`` at ``start + at`` with ``move``
    (os.preadv or os.pwritev), in calls the kernel takes whole; False if the object
    ended first (a short read) or had no room (a write)."""
    done = 0
    while done < length:
        here = at + done
        try:
            moved = move(fd, [view[here : here + min(length - done, _MAX_IO)]], start + here)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                return False
            raise
        if moved <= 0:
            return False
        done += moved
    return True


class Window:
    """A ``MAP_SHARED`` mapping of ``length`` bytes of ``fd`` from ``offset``, written
    only by the kernel (process_vm_writev), never dereferenced here. Unmapped once
    nothing holds it: a request writing through it keeps it mapped."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "no process_vm_writev here")
        lead = offset % _PAGE
        size = lead + length
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        address = _LIBC.mmap(None, size, prot, mmap.MAP_SHARED, fd, offset - lead)
        if address is None or address == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.offset = offset
        self.length = length
        self._address = address + lead
        #: False once the kernel refused process_vm_writev: writes use pwritev then.
        self.usable = True
        self._unmap = weakref.finalize(self, _LIBC.munmap, address, size)
        self._unmap.atexit = False

    def close(self) -> None:
        """Unmap it now (no write may be under way, nor come after)."""
        self.usable = False
        self._unmap()

    def write(self, start: int, data: memoryview) -> bool:
        """``data`` into the object at ``start`` (inside this window); False if a page
        past the object's end stopped it. OSError if the kernel refuses the call."""
        if not self.offset <= start <= start + data.nbytes <= self.offset + self.length:
            raise ValueError("a write outside its window")
        local = np.frombuffer(data, np.uint8).ctypes.data  # ``data`` keeps it valid
        remote = self._address + (start - self.offset)
        pid = os.getpid()

        def piece(at: int, length: int) -> bool:
            done = 0
            while done < length:
                step = min(length - done, _MAX_IO)
                here = _IOVec(local + at + done, step)
                there = _IOVec(remote + at + done, step)
                moved = _LIBC.process_vm_writev(pid, here, 1, there, 1, 0)
                if moved < 0:
                    code = ctypes.get_errno()
                    if code in (errno.EFAULT, errno.ENOMEM):
                        return False  # a page past the end (or none to be had)
                    raise OSError(code, os.strerror(code))
                if moved == 0:
                    return False
                done += moved
            return True

        return _in_pieces(data.nbytes, piece)


def _in_pieces(nbytes: int, piece: Callable[[int, int], bool]) -> bool:
    """``piece(at, length)`` over all of ``[0, nbytes)``, cut into up to MAX_PIECES
    pieces of at least PIECE bytes, one on this thread and the rest on helpers; True
    if every piece was whole."""
    count = min(MAX_PIECES, nbytes // PIECE)
    if count <= 1:
        return piece(0, nbytes)
    size = -(-nbytes // count)
    pool = _pool()
    helping: list[Future[bool]] = [
        pool.submit(piece, at, min(size, nbytes - at)) for at in range(size, nbytes, size)
    ]
    try:
        mine = piece(0, size)
    finally:
        # Never return while a helper copies: the pieces are raw addresses, valid only
        # while the caller holds what they point into.
        futures.wait(helping)
    return all([f.result() for f in helping]) and mine


def _pool() -> ThreadPoolExecutor:
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(MAX_PIECES - 1, thread_name_prefix="tensorwire-copy")
        return _helpers
