"""Where streamed request payloads land: on CUDA, host buffers copied to the device
while the rest of the stream still arrives.

A streamed request's receiver asks a Stager for each tensor's buffer and tells it as
bytes land. On the CPU the buffer is the tensor. On CUDA each buffer is pinned host
memory from torch's caching host allocator (so the blocks are reused from request to
request, not pinned afresh), and every few MiB that land are copied to a device
buffer on a side stream: by the time the last chunk arrives only its own copy is left.
While the request runs, ``tensors.to_device`` hands out the device copy of a staged
buffer instead of copying it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from tensorwire.wire.streaming import allocate_host
from tensorwire_server.device.faults import DeviceHealth
from tensorwire_server.limits import Limits

#: Largest tensor staged through pinned host memory on its way to or from a GPU.
#: torch's caching host allocator reuses pinned blocks (no cudaHostAlloc per request)
#: but rounds them up to a power of two and keeps them, so larger tensors go through
#: pageable memory rather than pin gigabytes for the life of the server.
PINNED_LIMIT = 256 << 20

# Bytes gathered before a host-to-device copy is launched: each launch costs
# microseconds, so per-chunk copies of 1 MiB would spend a few percent on launches.
COPY_BATCH = 8 << 20

# Host buffer address -> the device buffer holding the same bytes, while a staged
# request runs (set around the request by Stager.using).
_STAGED: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("staged", default=None)


class Stager:
    """The destination of one streamed request's payloads, within ``limits``. Host
    memory on the CPU."""

    #: Whether each buffer is the tensor the request runs on (no staging): memory
    #: the payload already lies in may then be used in place of it.
    in_place = True

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.declared = 0  # payload bytes allocated so far

    def allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> np.ndarray:
        """The buffer one tensor's chunks are written into, once the limits allow it."""
        self.admit(dtype, shape, name)
        return allocate_host(dtype, shape, name)

    def admit(self, dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> int:
        """Check one more tensor against the limits; its size in bytes."""
        nbytes = self.limits.tensor(name, shape) * dtype.itemsize
        self.declared += nbytes
        self.limits.request_bytes(self.declared)
        return nbytes

    def landed(self, index: int, start: int, stop: int) -> None:
        """Bytes [start, stop) of the ``index``-th buffer have arrived."""

    @contextmanager
    def using(self) -> Iterator[None]:
        """Run the request with its staged tensors; every byte has arrived."""
        yield

    def close(self) -> None:
        """Let go of every buffer, whether the stream finished or not."""


class CopyBatches:
    """Which bytes of each staged buffer go to the device next, and when: a batch once
    ``batch`` bytes have landed past the last copy (or the buffer is full), launched by
    ``launch(index, start, stop)`` under one lock with ``close``, so that nothing is
    launched once ``close`` has begun, and ``close`` waits for a launch under way."""

    def __init__(self, launch: Callable[[int, int, int], None], batch: int = COPY_BATCH) -> None:
        self._launch = launch
        self.batch = batch
        self._lock = threading.Lock()
        self.closed = False
        self._sizes: list[int] = []
        self._copied: list[int] = []  # bytes of each buffer launched so far

    def add(self, nbytes: int) -> None:
        """One more buffer, ``nbytes`` long."""
        with self._lock:
            self._sizes.append(nbytes)
            self._copied.append(0)

    def landed(self, index: int, stop: int) -> None:
        """Bytes up to ``stop`` of buffer ``index`` have arrived: launch a batch if due."""
        with self._lock:
            if self.closed:
                return
            done = self._copied[index]
            if stop <= done or (stop - done < self.batch and stop < self._sizes[index]):
                return
            self._launch(index, done, stop)
            self._copied[index] = stop

    def close(self) -> bool:
        """Launch nothing more; True the first time."""
        with self._lock:
            first, self.closed = not self.closed, True
            return first


class CudaStager(Stager):
    """Pinned host buffers, each copied to ``device`` on a side stream as it fills.

    Tensors larger than ``pinned_limit`` get pageable host memory (see PINNED_LIMIT);
    their copies still run as chunks arrive, synchronously, as the driver stages them.

    ``landed`` is called from the thread that receives the payload (the data port's),
    ``close`` from the event loop when the stream ends, however it ends: the two are
    ordered by a lock, and nothing is copied once ``close`` has begun. CUDA errors
    that surface here go to ``health``, the engine's (device/faults.py).
    """

    in_place = False

    def __init__(
        self,
        device: torch.device,
        limits: Limits,
        pinned_limit: int = PINNED_LIMIT,
        health: DeviceHealth | None = None,
    ) -> None:
        super().__init__(limits)
        self.device = device
        self.pinned_limit = pinned_limit
        self.health = health or DeviceHealth(device)
        self.stream = staging_stream(device)
        self._batches = CopyBatches(self._launch)
        self._hosts: list[torch.Tensor] = []
        self._devices: list[torch.Tensor] = []
        self._addresses: dict[int, torch.Tensor] = {}

    def allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> np.ndarray:
        nbytes = self.admit(dtype, shape, name)
        # Out of memory: RESOURCE_EXHAUSTED, the device serving on, and no collection
        # (this runs on the event loop and holds nothing to give back); a sticky error
        # that surfaces here (a request before this one failed asynchronously) fails it.
        with self.health.guard(f"staging {name!r} ({nbytes} bytes)", recover=False):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=nbytes <= self.pinned_limit)
            on_device = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        arr = host.numpy().view(dtype).reshape(shape)
        # The buffer is known to the batches before a byte of it can land.
        self._hosts.append(host)
        self._devices.append(on_device)
        if nbytes:
            self._addresses[arr.__array_interface__["data"][0]] = on_device
        self._batches.add(nbytes)
        return arr

    def landed(self, index: int, start: int, stop: int) -> None:
        self._batches.landed(index, stop)

    def _launch(self, index: int, start: int, stop: int) -> None:
        source, target = self._hosts[index][start:stop], self._devices[index][start:stop]
        with self.health.guard("staging a request's payload"), torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)

    @contextmanager
    def using(self) -> Iterator[None]:
        # Work queued on this thread's stream from here on runs after the copies.
        with self.health.guard("staging a request's payload"):
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        token = _STAGED.set(self._addresses)
        try:
            yield
        finally:
            _STAGED.reset(token)

    def close(self) -> None:
        if not self._batches.close():
            return
        # From here no copy is launched (a landing on the data port's thread waited
        # for the lock, or finds the batches closed).
        devices = self._devices
        self._hosts, self._devices, self._addresses = [], [], {}
        if not devices:
            return
        # No wait on the host (this runs on the event loop). A cut stream may leave
        # copies in flight on the side stream: the device buffers were allocated on
        # the ambient stream, the only one the caching allocator reuses their blocks
        # for, so it waits for the side stream before they are freed (PyTorch's CUDA
        # semantics: a sync back to the creation stream, deterministic, rather than
        # record_stream). Pinned blocks are safe already: the caching host allocator
        # records an event on the copy's stream and reuses a block only once it passed.
        # Never raises: it runs in the stream handler's finally, before the call's data
        # port transfer is abandoned and revoked, and must not hide the call's own
        # status. On a failed device nothing runs after the copies anyway; an error
        # here the guard has reported to the hook (a sticky one fails the device).
        if self.health.failure is None:
            with suppress(Exception), self.health.guard("closing a request's staging"):
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
        del devices


def staging_stream(device: torch.device) -> Any:
    """A side stream for staging copies, from torch's high-priority pool: each
    priority has its own round-robin pool of streams (torch.cuda.Stream), so a stager
    never shares a stream with a model's instance (default priority), and nothing it
    waits for is another request's model work. The copies also go ahead of kernels."""
    return torch.cuda.Stream(device, priority=-1)  # type: ignore[no-untyped-call]


def staged(arr: np.ndarray) -> torch.Tensor | None:
    """The device buffer holding ``arr``'s bytes, if ``arr`` is a whole staged buffer
    of the request running on this thread; a flat uint8 tensor."""
    addresses = _STAGED.get()
    if not addresses or not arr.nbytes:
        return None
    on_device = addresses.get(arr.__array_interface__["data"][0])
    if on_device is None or on_device.numel() != arr.nbytes or not arr.flags.c_contiguous:
        return None
    return on_device


def stager_for(device: torch.device, limits: Limits, health: DeviceHealth | None = None) -> Stager:
    """The stager a streamed request to ``device`` lands in (its CUDA errors reported
    to ``health``)."""
    if device.type == "cuda":
        return CudaStager(device, limits, health=health)
    return Stager(limits)
