"""What a CUDA error that surfaced means for the device, and the one hook every package
reports it to (``DeviceHealth``).

CUDA reports a kernel's failure asynchronously: at the next call that waits for the
device, on whatever thread makes it (a copy to the host, a synchronize, an allocation,
a later kernel). Some errors poison the context for good ("sticky": a device-side
assert, an illegal address or instruction, a misaligned address, a launch failure and
their kin): every later call fails too, so the server must stop serving and be
restarted. Others concern one request and leave the device usable: out of memory
(``cudaErrorMemoryAllocation``, cuBLAS' ``CUBLAS_STATUS_ALLOC_FAILED`` when a thread's
first matmul cannot get its workspace), an invalid launch configuration from a shape
the request chose. So each error is classified by its code (``torch.AcceleratorError``
carries ``error_code``) or its text, and an unknown CUDA error is confirmed with a
guarded synchronize: a sticky error is returned by every later call.

``DeviceHealth.guard`` wraps every place a CUDA error can surface (the engine's
requests, staging, CUDA regions, exports): it selects the device on the calling thread
(the event loop or a worker: torch's current device is per thread), marks the device
failed only for a sticky error, and turns out-of-memory into RESOURCE_EXHAUSTED after
letting go of the failed request's tensors.
"""

from __future__ import annotations

import enum
import gc
import logging
import os
import threading
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Final

import torch

from tensorwire.errors import InternalError, ResourceExhaustedError, TensorwireError

log = logging.getLogger(__name__)

_MAX_MESSAGE: Final = 2000  # characters of an error message passed on


class Fault(enum.Enum):
    """What an exception says about the device."""

    #: Not a device error: the caller's problem or a bug, whatever it was.
    OTHER = "other"
    #: Out of device (or host) memory: this request fails, the device serves on.
    OUT_OF_MEMORY = "out of memory"
    #: A CUDA error that leaves the context usable (an invalid launch configuration).
    RECOVERABLE = "recoverable"
    #: A CUDA error not known either way: confirm it (``DeviceHealth.confirm``).
    UNKNOWN = "unknown"
    #: The context is poisoned: every later CUDA call fails.
    STICKY = "sticky"


#: cudaError_t (and the driver's CUresult, same numbers) that poison the context:
#: ECC uncorrectable, NVLink uncorrectable, illegal address, launch timeout, assert,
#: hardware stack error, illegal instruction, misaligned address, invalid address
#: space, invalid PC, launch failure, and the unknown error a lost GPU gives.
STICKY_CODES: Final = frozenset({214, 220, 700, 702, 710, 714, 715, 716, 717, 718, 719, 999})
#: Out of memory (cudaErrorMemoryAllocation, CUDA_ERROR_OUT_OF_MEMORY).
OOM_CODES: Final = frozenset({2})
#: Invalid configuration, too many resources requested for a launch: the launch is
#: refused before it runs, the context is untouched.
RECOVERABLE_CODES: Final = frozenset({9, 701})

STICKY_TEXT: Final = (
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "misaligned address",
    "invalid address space",
    "invalid program counter",
    "unspecified launch failure",
    "launch timed out",
    "hardware stack error",
    "uncorrectable ecc",
    "uncorrectable nvlink",
    "cuda_error_assert",
    "cuda_error_illegal_address",
    "cuda_error_launch_failed",
)
OOM_TEXT: Final = ("out of memory", "can't allocate memory", "_alloc_failed", "allocation failed")
RECOVERABLE_TEXT: Final = (
    "invalid configuration argument",
    "too many resources requested for launch",
)
#: Text that marks an error as CUDA's (or a CUDA library's) at all.
CUDA_TEXT: Final = ("cuda error", "cuda driver error", "cublas_status", "cudnn_status", "cusolver")


def classify(exc: BaseException) -> Fault:
    """What ``exc`` says about the device, from its code when it has one, else its
    text. Sticky is checked first: a sticky error's message may go on to mention
    memory, never the other way round."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return Fault.OUT_OF_MEMORY
    if not isinstance(exc, RuntimeError):
        return Fault.OTHER
    code = getattr(exc, "error_code", None)
    if isinstance(code, int):
        if code in STICKY_CODES:
            return Fault.STICKY
        if code in OOM_CODES:
            return Fault.OUT_OF_MEMORY
        if code in RECOVERABLE_CODES:
            return Fault.RECOVERABLE
    text = str(exc).lower()
    if any(s in text for s in STICKY_TEXT):
        return Fault.STICKY
    if any(s in text for s in OOM_TEXT):
        return Fault.OUT_OF_MEMORY
    if any(s in text for s in RECOVERABLE_TEXT):
        return Fault.RECOVERABLE
    if isinstance(exc, torch.AcceleratorError) or any(s in text for s in CUDA_TEXT):
        return Fault.UNKNOWN
    return Fault.OTHER


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, bounded (what a status may quote)."""
    text = str(exc).strip()
    return text.splitlines()[0][:_MAX_MESSAGE] if text else type(exc).__name__


# The device the innermost guard selected on this thread (or task): what code that
# names no device ("cuda", a bare current_stream()) means while a request runs.
_SELECTED: ContextVar[torch.device | None] = ContextVar("selected_device", default=None)


def selected() -> torch.device | None:
    """The device the request running here selected (None outside every guard)."""
    return _SELECTED.get()


class DeviceHealth:
    """One device's health: SERVING until a sticky error surfaces anywhere, then
    failed for good, once reported to ``on_failure`` (the server stops serving)."""

    def __init__(
        self, device: torch.device, on_failure: Callable[[str], None] | None = None
    ) -> None:
        self.device = device
        self.on_failure = on_failure
        #: The first sticky error's message; None while the device is healthy.
        self.failure: str | None = None
        self._lock = threading.Lock()

    def guard(self, what: str, recover: bool = True) -> Guard:
        """A context for work on the device: the device selected on this thread, every
        error that surfaces classified (see the module's docstring). ``recover=False``
        for work that holds no request's tensors (an allocation): out of memory is then
        RESOURCE_EXHAUSTED without a collection, which could not give anything back
        (the caching allocator frees its cache and retries before it raises)."""
        return Guard(self, what, recover)

    def surfaced(self, what: str, exc: BaseException) -> Fault:
        """Hear that ``exc`` surfaced in ``what``; what it means, confirmed. A sticky
        error fails the device (once)."""
        fault = classify(exc)
        if fault is Fault.UNKNOWN:
            fault = self.confirm()
        if fault is Fault.STICKY:
            self.fail(what, first_line(exc))
        return fault

    def confirm(self) -> Fault:
        """Whether the context is poisoned, by a synchronize: a sticky error comes back
        from every call once it has happened; a recoverable one does not."""
        if self.device.type != "cuda":
            return Fault.RECOVERABLE
        try:
            torch.cuda.synchronize(self.device)
        except Exception as exc:
            again = classify(exc)
            # An error from a bare synchronize is no request's fault: the device's.
            return Fault.STICKY if again in (Fault.STICKY, Fault.UNKNOWN) else again
        return Fault.RECOVERABLE

    def fail(self, what: str, reason: str) -> None:
        """Mark the device failed for good (the first reason stays), telling
        ``on_failure`` once."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = reason
        log.critical("%s: the device failed and cannot recover: %s", what, reason)
        if first and self.on_failure is not None:
            self.on_failure(reason)

    def refusal(self, what: str) -> InternalError:
        """The error a request gets once the device failed. INTERNAL, not UNAVAILABLE:
        a retry would fail here again, and the request that broke this device could
        break the next replica's; health says NOT_SERVING, so the orchestrator
        restarts this one."""
        return InternalError(
            f"{what}: the server's {self.device.type} device failed ({self.failure}); "
            "this server must be restarted"
        )

    def recover(self) -> None:
        """Give memory back after out-of-memory, once the failed request's tensors are
        gone: collect (tracebacks and frames hold cycles), then empty the allocator's
        cache so that the next request, or another process, finds the memory."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def free_memory(self) -> int:
        """Bytes free on the device now (host memory on the CPU)."""
        if self.device.type == "cuda":
            try:
                return int(torch.cuda.mem_get_info(self.device)[0])
            except Exception:  # only said in a message: never fail for it
                return 0
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Guard:
    """``DeviceHealth.guard``'s context (a class, not a generator: its ``__exit__``
    must raise the request's error after letting go of the failed one)."""

    def __init__(self, health: DeviceHealth, what: str, recover: bool = True) -> None:
        self.health = health
        self.what = what
        self.recover = recover
        self._token: object = None
        self._device: torch.cuda.device | None = None

    def __enter__(self) -> Guard:
        health = self.health
        if health.failure is not None:
            raise health.refusal(self.what)
        if health.device.type == "cuda":
            # torch's current device is per thread; kernels launched by code that names
            # no device (a function's "cuda", a model's bare .cuda()) go to it.
            device = torch.cuda.device(health.device)
            try:
                device.__enter__()  # type: ignore[no-untyped-call]
            except Exception as exc:  # an earlier request's error surfaced here
                if health.surfaced(self.what, exc) is Fault.STICKY:
                    raise health.refusal(self.what) from exc
                raise
            self._device = device
        self._token = _SELECTED.set(health.device)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _SELECTED.reset(self._token)  # type: ignore[arg-type]
        health = self.health
        if self._device is not None:
            try:  # back to the thread's device; after a sticky error this may fail too
                self._device.__exit__(None, None, None)
            except Exception as restoring:
                if exc is None:  # the error surfaced here: report it, then raise it
                    if health.surfaced(self.what, restoring) is Fault.STICKY:
                        raise health.refusal(self.what) from restoring
                    raise
                log.debug("%s: restoring the current device failed: %s", self.what, restoring)
        if exc is None or not isinstance(exc, Exception) or _is_ours(exc):
            return
        fault = health.surfaced(self.what, exc)
        if fault is Fault.STICKY:
            raise health.refusal(self.what) from exc
        if fault is not Fault.OUT_OF_MEMORY:
            return
        message = first_line(exc)
        # The failed request's tensors live in the frames of its traceback (the model's
        # activations, say): clear them and drop the traceback before emptying the
        # cache, or the blocks stay taken and the cache cannot give them back.
        if tb is not None:
            traceback.clear_frames(tb)
        exc.__traceback__ = None
        del exc, tb
        if self.recover:
            health.recover()
        error = ResourceExhaustedError(
            f"{self.what} ran out of {health.device.type} memory "
            f"({health.free_memory()} bytes free now): {message}"
        )
        raise error from None


def _is_ours(exc: Exception) -> bool:
    """tensorwire's own errors (an inner guard's among them) pass through as they are."""
    return isinstance(exc, TensorwireError)


__all__ = ["DeviceHealth", "Fault", "Guard", "classify", "first_line", "selected"]
