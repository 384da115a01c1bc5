"""Mappings of files a client can shrink, made safe against SIGBUS.

A client's shared-memory object can be shrunk (``ftruncate``) at any moment, and a load
or store through a mapping past its new end raises SIGBUS, which kills the process by
default; so does a store that needs a page a full ``/dev/shm`` cannot give. Kernel
copies (``pread``, ``pwrite``) cannot fault, but on the 2-core machine they move 5 GiB/s
against memcpy's 11, and they cannot hand a model its input in place.

So the server maps, and a SIGBUS handler turns a fault inside one of these mappings into
a flag: it marks the mapping shrunk and maps zeroed anonymous memory over all of it, so
the faulting access completes (on memory nobody else sees) and the thread goes on.
Whoever used the mapping checks ``shrunk`` afterwards and fails its request. A fault
anywhere else goes to the handler that was there before (by default: the process dies,
as it would have without this module).

The handler is Python (a ctypes callback). It runs in the faulting thread, which was in
a copy or a torch kernel, not in the interpreter, and takes the GIL as any callback from
C does. It calls ``mmap`` through ``PyDLL`` so the GIL is held from the lookup to the
remap: a mapping cannot be unmapped (its finalizer holds the GIL too) and its addresses
reused in between.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import signal
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

#: Whether mappings are safe here: Linux on a 64-bit machine where glibc's struct
#: sigaction and siginfo_t have the layout below (x86_64, aarch64). Elsewhere callers
#: copy with pread/pwrite instead.
SUPPORTED: Final = (
    sys.platform == "linux"
    and platform.machine() in ("x86_64", "aarch64")
    and ctypes.sizeof(ctypes.c_void_p) == 8
)

_PROT_RW: Final = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED: Final = 0x10
_MAP_ANONYMOUS: Final = 0x20
_MAP_FAILED: Final = (1 << 64) - 1
_SA_SIGINFO: Final = 0x4
_SA_RESTART: Final = 0x10000000
#: siginfo_t: si_signo, si_errno, si_code (three ints, padded to 16), then si_addr.
_SI_ADDR: Final = 16
_PAGE: Final = mmap.PAGESIZE


class _SigAction(ctypes.Structure):
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * 16),  # sigset_t: 1024 bits
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


_Handler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _libc(kind: type[ctypes.CDLL]) -> Any:
    lib = kind(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


# PyDLL: calls keep the GIL (see the module's note); they are all short system calls.
_LIBC: Final[Any] = _libc(ctypes.PyDLL) if SUPPORTED else None


@dataclass(eq=False)
class _Range:
    start: int
    size: int
    shrunk: bool = False
    end: int = field(init=False)

    def __post_init__(self) -> None:
        self.end = self.start + self.size


#: Every live mapping by start address, for the handler; changed only under the GIL.
_LIVE: dict[int, _Range] = {}
_previous = _SigAction()
_install_lock = threading.Lock()
#: Faults the handler absorbed (each spoiled one mapping), for tests and operators.
_faults = 0


def _on_sigbus(signo: int, info: int, context: int) -> None:
    try:
        address = ctypes.c_void_p.from_address(info + _SI_ADDR).value or 0
        for live in tuple(_LIVE.values()):
            if live.start <= address < live.end:
                global _faults
                _faults += 1
                live.shrunk = True
                flags = mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED
                if _LIBC.mmap(live.start, live.size, _PROT_RW, flags, -1, 0) == live.start:
                    return  # the access runs again, on the zeroed memory
                break
    except BaseException:  # nothing may escape a signal handler
        pass
    # Not one of ours (or the remap failed): put the previous handler back; the access
    # runs again and faults to it, as if this module had never been here.
    _LIBC.sigaction(signal.SIGBUS, ctypes.byref(_previous), None)


_HANDLER: Final = _Handler(_on_sigbus)
_HANDLER_ADDRESS: Final = ctypes.cast(_HANDLER, ctypes.c_void_p).value


def _install() -> None:
    """Make ``_on_sigbus`` the SIGBUS handler, keeping the one it replaces (again if
    someone, faulthandler say, took the signal since)."""
    with _install_lock:
        current = _SigAction()
        _LIBC.sigaction(signal.SIGBUS, None, ctypes.byref(current))
        if current.handler == _HANDLER_ADDRESS:
            return
        ours = _SigAction(handler=_HANDLER_ADDRESS, flags=_SA_SIGINFO | _SA_RESTART)
        if _LIBC.sigaction(signal.SIGBUS, ctypes.byref(ours), ctypes.byref(_previous)) != 0:
            raise OSError(ctypes.get_errno(), "sigaction(SIGBUS) failed")


class _Pages:
    """The object a mapping's arrays are views of: numpy keeps it alive as their base,
    and its finalizer unmaps the pages once no array (or tensor) uses them."""

    def __init__(self, address: int, length: int) -> None:
        self.__array_interface__ = {
            "shape": (length,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }


def _unmap(live: _Range) -> None:
    # Forget the range before the pages go (both under the GIL): the handler never
    # sees a range whose addresses may already belong to someone else.
    _LIVE.pop(live.start, None)
    _LIBC.munmap(live.start, live.size)


class Mapping:
    """``length`` bytes of the file ``fd`` from ``offset`` as a writable uint8 array:
    ``private`` mappings are copy-on-write (reads see the file, writes stay in this
    process), others write through to the file. The pages are unmapped when neither
    this object nor any view of ``array`` is left."""

    def __init__(self, fd: int, offset: int, length: int, *, private: bool) -> None:
        if length <= 0:
            raise ValueError("a mapping needs a positive length")
        _install()
        lead = offset % _PAGE
        size = lead + length
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        start = _LIBC.mmap(None, size, _PROT_RW, flags, fd, offset - lead)
        if start is None or start == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed")
        self._range = _Range(start, size)
        _LIVE[start] = self._range
        pages = _Pages(start + lead, length)
        # Not at exit: pages a thread may still read go with the process anyway.
        weakref.finalize(pages, _unmap, self._range).atexit = False
        self.array: np.ndarray = np.asarray(pages)

    @property
    def shrunk(self) -> bool:
        """Whether an access faulted (the file shrank under it, or a page could not be
        had): the mapping holds zeros since, and what used it must be thrown away."""
        return self._range.shrunk


def live() -> int:
    """Mappings not yet unmapped (tests check that none leak)."""
    return len(_LIVE)


def faults() -> int:
    """Faults absorbed since the server started: each a mapping spoiled by a shrink."""
    return _faults
