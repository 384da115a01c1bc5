"""CUDA shared memory (Triton's extension of the v2 protocol): device allocations that
clients on this host export with CUDA IPC (``cudaIpcGetMemHandle``) and register by
handle, each region owned by the caller that registered it.

Handles are opened with the CUDA driver (``libcuda``, through ctypes: torch has no
public call for a foreign IPC handle) in the device's primary context, the one torch
uses, and the region becomes a uint8 tensor over the client's memory
(``__cuda_array_interface__``). Inputs are copied device to device into tensors of the
request's own, so a model that writes to its input or keeps it never touches the
client's memory; outputs are copied device to device into the region, and the copy is
finished before the answer goes out. Nothing crosses the PCIe bus.

A handle cannot say how large its allocation is, but the driver can: a region is
refused when its byte size runs past the allocation (``cuMemGetAddressRange``), so no
copy can reach memory the client did not export.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np
import torch

from tensorwire.errors import (
    InternalError,
    InvalidArgumentError,
    UnimplementedError,
    shown,
)
from tensorwire_server.device.faults import DeviceHealth
from tensorwire_server.device.tensors import from_numpy
from tensorwire_server.regions.table import Placement, RegionTable

log = logging.getLogger(__name__)

#: Bytes in a cudaIpcMemHandle_t (CU_IPC_HANDLE_SIZE).
HANDLE_BYTES: Final = 64
_LAZY_ENABLE_PEER_ACCESS: Final = 1


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]


class _Driver:
    """The few CUDA driver calls CUDA IPC needs, each in the primary context of the
    device it concerns (pushed and popped around it, so any thread may call).

    None of its failures is worth a retry (not UNAVAILABLE): a driver that cannot be
    loaded, or lacks a call, means this server cannot offer CUDA IPC at all
    (UNIMPLEMENTED, as for a server without a device); one that cannot start is
    broken, which only its operator can mend (INTERNAL)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise UnimplementedError(
                f"the CUDA driver (libcuda.so.1) cannot be loaded, so this server offers no "
                f"CUDA shared memory: {exc}"
            ) from None
        self._lib = lib
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        try:
            self._call("cuInit", ctypes.c_uint(0))
        except _DriverError as exc:
            raise InternalError(f"the CUDA driver cannot start: {exc}") from None

    def _function(self, name: str) -> Any:
        # cuda.h maps these names to their _v2 symbols; older drivers have only the first.
        for symbol in (f"{name}_v2", name):
            if hasattr(self._lib, symbol):
                return getattr(self._lib, symbol)
        raise UnimplementedError(
            f"the CUDA driver has no {name}, so this server offers no CUDA shared memory"
        )

    def _call(self, name: str, *args: Any) -> None:
        result = self._function(name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(result, ctypes.byref(text))
            reason = (text.value or b"unknown error").decode(errors="replace")
            raise _DriverError(f"{name}: {reason} (CUresult {result})")

    def _context(self, device: int) -> ctypes.c_void_p:
        with self._lock:
            context = self._contexts.get(device)
            if context is None:
                handle, context = ctypes.c_int(), ctypes.c_void_p()
                self._call("cuDeviceGet", ctypes.byref(handle), ctypes.c_int(device))
                # Retained for the server's life: torch holds the same context anyway.
                self._call("cuDevicePrimaryCtxRetain", ctypes.byref(context), handle)
                self._contexts[device] = context
            return context

    def _within(self, device: int, name: str, *args: Any) -> None:
        self._call("cuCtxPushCurrent", self._context(device))
        try:
            self._call(name, *args)
        finally:
            popped = ctypes.c_void_p()
            self._call("cuCtxPopCurrent", ctypes.byref(popped))

    def open(self, handle: bytes, device: int) -> tuple[int, int]:
        """The address of the allocation ``handle`` exports, opened on ``device``, and
        the allocation's size in bytes."""
        address = ctypes.c_uint64()
        raw = _Handle.from_buffer_copy(handle)
        flags = ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS)
        self._within(device, "cuIpcOpenMemHandle", ctypes.byref(address), raw, flags)
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        try:
            self._within(
                device, "cuMemGetAddressRange", ctypes.byref(base), ctypes.byref(size), address
            )
        except BaseException:
            self.close(address.value, device)
            raise
        return address.value, base.value + size.value - address.value

    def close(self, address: int, device: int) -> None:
        """Let go of an allocation ``open`` gave."""
        self._within(device, "cuIpcCloseMemHandle", ctypes.c_uint64(address))


class _DriverError(Exception):
    """A CUDA driver call failed (the message says which, and why)."""


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def _the_driver() -> _Driver:
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


class Uses:
    """The last copy each stream made to or from one region's memory, as CUDA events:
    what must be finished before its handle may close."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[int, Any] = {}

    def record(self, stream: Any) -> None:
        """A copy was just queued on ``stream``."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        with self._lock:
            self._events[stream.stream_id] = event

    def pending(self) -> list[Any]:
        """The events not yet passed."""
        with self._lock:
            return [e for e in self._events.values() if not e.query()]


class _DeviceMemory:
    """A client's allocation as torch imports it: tensors over it keep this object,
    and its finalizer closes the handle once none is left (after the copies that
    might still read or write it are done: ``Uses``)."""

    def __init__(
        self, driver: _Driver, address: int, length: int, device: int, health: DeviceHealth
    ) -> None:
        self.__cuda_array_interface__ = {
            "shape": (length,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,  # the caller orders its own copies (see write and read)
        }
        self.uses = Uses()
        # Not at exit: the driver lets go of everything with the process.
        finalizer = weakref.finalize(self, _close, driver, address, device, self.uses, health)
        finalizer.atexit = False


def _close(driver: _Driver, address: int, device: int, uses: Uses, health: DeviceHealth) -> None:
    """Close the handle once the copies that used the memory are done. The finalizer
    runs on whichever thread drops the last tensor (the event loop, on Unregister), so
    it waits for nothing there: only this region's own copies matter, not the whole
    device's work, and if one is still running a thread waits for it instead."""
    try:
        pending = uses.pending()
    except Exception as exc:  # a sticky error surfaced: the device is gone anyway
        health.surfaced("closing a CUDA shared-memory region", exc)
        pending = []
    if not pending:
        _close_now(driver, address, device)
        return
    threading.Thread(
        target=_close_after,
        args=(driver, address, device, pending, health),
        name="tensorwire-cuda-close",
        daemon=True,
    ).start()


def _close_after(
    driver: _Driver, address: int, device: int, pending: list[Any], health: DeviceHealth
) -> None:
    try:
        for event in pending:
            event.synchronize()
    except Exception as exc:
        health.surfaced("closing a CUDA shared-memory region", exc)
    finally:  # the handle closes whatever the wait said: the client's memory is theirs
        _close_now(driver, address, device)


def _close_now(driver: _Driver, address: int, device: int) -> None:
    try:
        driver.close(address, device)
    except _DriverError as exc:
        log.warning("closing a CUDA IPC handle on device %d failed: %s", device, exc)


@dataclass(frozen=True)
class CudaRegionStatus:
    """One registered region, as CudaSharedMemoryStatus describes it."""

    name: str
    device_id: int
    byte_size: int


@dataclass(frozen=True)
class _CudaRegion:
    noun: ClassVar[str] = "CUDA shared-memory"
    status: CudaRegionStatus
    memory: torch.Tensor  # uint8, byte_size long, on the region's device
    #: The copies to and from it, which its handle's close waits for.
    uses: Uses = field(default_factory=Uses)

    def release(self) -> None:
        """Nothing now: the handle closes with the last tensor over the memory."""


class CudaSharedMemory:
    """Every caller's CUDA regions, in the ``table`` (and within the limits) they share
    with system regions. Refuses everything while the table is not ``enabled``
    (FAILED_PRECONDITION: the operator can turn it on) and, on a server without a CUDA
    device, UNIMPLEMENTED: this server does not offer the extension (ServerMetadata
    does not list it), and no retry or setting changes that."""

    def __init__(self, table: RegionTable) -> None:
        self.table = table
        #: The server's device, once its engine is built (Service.ready).
        self.device = torch.device("cpu")
        #: Where CUDA errors that surface here are reported: the engine's (ready).
        self.health = DeviceHealth(self.device)

    @property
    def enabled(self) -> bool:
        """Whether shared memory is on (the server's flag)."""
        return self.table.enabled

    @property
    def available(self) -> bool:
        """Whether CUDA shared memory can be used here at all (the flag and a device)."""
        return self.enabled and self.device.type == "cuda"

    def _on(self) -> None:
        self.table.on()
        if self.device.type != "cuda":
            raise UnimplementedError(
                f"this server has no CUDA device (it runs on {self.device}): CUDA shared "
                "memory needs one; use system shared memory (register_system_shared_memory) "
                "on this host"
            )

    def register(
        self, owner: str, name: str, raw_handle: bytes, device_id: int, byte_size: int
    ) -> None:
        """Open ``raw_handle`` (a cudaIpcMemHandle_t's bytes) on device ``device_id``
        and register ``byte_size`` bytes from its start as ``owner``'s region ``name``."""
        self._on()
        if len(raw_handle) != HANDLE_BYTES:
            raise InvalidArgumentError(
                f"region {shown(name)}: raw_handle is {len(raw_handle)} bytes; a CUDA IPC "
                f"handle (cudaIpcGetMemHandle's) is {HANDLE_BYTES}"
            )
        count = torch.cuda.device_count()
        if not 0 <= device_id < count:
            raise InvalidArgumentError(
                f"region {shown(name)}: device_id {device_id} is not one of this server's "
                f"{count} CUDA devices (0 to {count - 1})"
            )
        self.table.reserve(owner, name, byte_size)  # before opening anything
        driver = _the_driver()
        try:
            address, length = driver.open(raw_handle, device_id)
        except _DriverError as exc:
            raise InvalidArgumentError(
                f"region {shown(name)}: the CUDA IPC handle cannot be opened on device "
                f"{device_id} ({exc}): export it with cudaIpcGetMemHandle from another "
                "process on this host"
            ) from None
        memory: _DeviceMemory | None = None
        try:
            if byte_size > length:
                raise InvalidArgumentError(
                    f"region {shown(name)}: byte_size {byte_size} runs past the end of the "
                    f"exported allocation, which holds {length} bytes from its address"
                )
            # From here the handle closes with the memory, once no tensor uses it.
            memory = _DeviceMemory(driver, address, length, device_id, self.health)
            with self.health.guard(f"region {shown(name)}"):
                tensor = torch.as_tensor(memory, device=torch.device("cuda", device_id))
            status = CudaRegionStatus(name, device_id, byte_size)
            self.table.add(owner, _CudaRegion(status, tensor[:byte_size], memory.uses))
        except BaseException:
            if memory is None:  # else the memory's finalizer closes it
                driver.close(address, device_id)
            raise

    def status(self, owner: str, name: str) -> list[CudaRegionStatus]:
        """``owner``'s regions (empty ``name``: all, by name); NOT_FOUND for a name
        ``owner`` has not registered."""
        self._on()
        return [region.status for region in self.table.listed(_CudaRegion, owner, name)]

    def unregister(self, owner: str, name: str) -> None:
        """Forget ``owner``'s region ``name`` (empty: all of them); an unknown name is
        no error (as in Triton)."""
        self._on()
        self.table.unregister(_CudaRegion, owner, name)

    def has(self, owner: str, name: str) -> bool:
        """Whether ``owner`` registered a CUDA region called ``name``."""
        return self.table.has(_CudaRegion, owner, name)

    def count(self) -> int:
        """CUDA regions registered, by every caller."""
        return self.table.count(_CudaRegion)

    def check(self, owner: str, place: Placement, what: str) -> None:
        """Refuse, before any work, a placement past its region's end."""
        self._region(owner, place, what)

    def read(
        self, owner: str, place: Placement, dtype: np.dtype[Any], shape: tuple[int, ...], what: str
    ) -> torch.Tensor:
        """The placement's bytes as a ``dtype`` tensor of ``shape`` of the request's
        own, on the region's device."""
        region = self._region(owner, place, what)
        memory = region.memory
        with self.health.guard(what):
            raw = memory[place.offset : place.offset + place.byte_size].clone()
            region.uses.record(torch.cuda.current_stream(memory.device))
            invalid = dtype.kind == "b" and bool((raw > 1).any())
        if invalid:
            raise InvalidArgumentError(f"{what}: bool payload holds bytes other than 0 and 1")
        typed = from_numpy(np.empty(0, dtype)).dtype
        return raw.view(typed).reshape(shape)

    def write(self, owner: str, place: Placement, tensor: torch.Tensor, what: str) -> None:
        """Copy ``tensor``'s bytes to the placement; done when this returns."""
        region = self._region(owner, place, what)
        memory = region.memory
        flat = tensor.detach().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        if nbytes > place.byte_size:
            raise InvalidArgumentError(
                f"{what} is {nbytes} bytes, more than its shared_memory_byte_size "
                f"({place.byte_size})"
            )
        if not nbytes:
            return
        with self.health.guard(what):
            # On the stream current on the region's device (an instance's, while a
            # model's outputs are exported): it follows the work that made ``flat``.
            stream = torch.cuda.current_stream(memory.device)
            if flat.is_cuda and flat.device != memory.device:
                # Another GPU's tensor: the copy must follow the work that made it.
                stream.wait_stream(torch.cuda.current_stream(flat.device))
            with torch.cuda.stream(stream):
                memory[place.offset : place.offset + nbytes].copy_(flat.view(torch.uint8))
            # The client may read the region as soon as the answer arrives: wait for
            # this copy, not for every other request's work on the device
            # (torch.cuda.synchronize would). Waited for here, it needs no event for the
            # handle's close to wait on (a read's clone, still running, does).
            stream.synchronize()

    def _region(self, owner: str, place: Placement, what: str) -> _CudaRegion:
        self._on()
        with self.table.lock:
            return self.table.placed(_CudaRegion, owner, place, what)


__all__ = ["CudaRegionStatus", "CudaSharedMemory"]
