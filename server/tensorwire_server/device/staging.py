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

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from tensorwire.errors import ResourceExhaustedError
from tensorwire.wire.streaming import allocate_host
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


class CudaStager(Stager):
    """Pinned host buffers, each copied to ``device`` on a side stream as it fills.

    Tensors larger than ``pinned_limit`` get pageable host memory (see PINNED_LIMIT);
    their copies still run as chunks arrive, synchronously, as the driver stages them.
    """

    in_place = False

    def __init__(
        self, device: torch.device, limits: Limits, pinned_limit: int = PINNED_LIMIT
    ) -> None:
        super().__init__(limits)
        self.device = device
        self.pinned_limit = pinned_limit
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._hosts: list[torch.Tensor] = []
        self._devices: list[torch.Tensor] = []
        self._copied: list[int] = []  # bytes of each buffer launched to the device
        self._addresses: dict[int, torch.Tensor] = {}

    def allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> np.ndarray:
        nbytes = self.admit(dtype, shape, name)
        try:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=nbytes <= self.pinned_limit)
            on_device = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except (RuntimeError, MemoryError):  # torch's out-of-memory errors are RuntimeErrors
            raise ResourceExhaustedError(f"{name}: cannot allocate {nbytes} bytes") from None
        arr = host.numpy().view(dtype).reshape(shape)
        self._hosts.append(host)
        self._devices.append(on_device)
        self._copied.append(0)
        if nbytes:
            self._addresses[arr.__array_interface__["data"][0]] = on_device
        return arr

    def landed(self, index: int, start: int, stop: int) -> None:
        done = self._copied[index]
        if stop <= done or (stop - done < COPY_BATCH and stop < self._hosts[index].numel()):
            return
        with torch.cuda.stream(self.stream):
            self._devices[index][done:stop].copy_(self._hosts[index][done:stop], non_blocking=True)
        self._copied[index] = stop

    @contextmanager
    def using(self) -> Iterator[None]:
        # Work queued on this thread's stream from here on runs after the copies.
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        token = _STAGED.set(self._addresses)
        try:
            yield
        finally:
            _STAGED.reset(token)

    def close(self) -> None:
        # A cut stream may leave copies in flight on the side stream; the caching
        # allocators must not hand their memory to anyone before those end.
        self.stream.synchronize()
        self._hosts, self._devices, self._copied = [], [], []
        self._addresses = {}


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


def stager_for(device: torch.device, limits: Limits) -> Stager:
    """The stager a streamed request to ``device`` lands in."""
    if device.type == "cuda":
        return CudaStager(device, limits)
    return Stager(limits)
