"""The one hook for CUDA errors (device/faults.py), on the CPU: which errors fail the
device for good and which leave it serving, the order out-of-memory recovery runs in,
and the device each request selects on the thread that runs it."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from tensorwire import InternalError, ResourceExhaustedError
from tensorwire_server.device.faults import DeviceHealth, Fault, classify, selected
from tensorwire_server.engine.engine import Engine
from tensorwire_server.engine.functions import FUNCTIONS, Function


def accelerator_error(message: str, code: int | None = None) -> torch.AcceleratorError:
    """The error torch raises for a failed CUDA call: its message, and error_code set
    as torch's C++ side sets it (PyObject_SetAttrString)."""
    exc = torch.AcceleratorError(message)
    if code is not None:
        exc.error_code = code  # type: ignore[attr-defined]
    return exc


STICKY = [
    RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be ..."),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: an illegal instruction was encountered"),
    RuntimeError("CUDA error: misaligned address"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: the launch timed out and was terminated"),
    RuntimeError("CUDA driver error: CUDA_ERROR_ILLEGAL_ADDRESS"),
    accelerator_error("CUDA error: device-side assert triggered", 710),
    accelerator_error("CUDA error: something new", 700),  # the code decides, not the text
]
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    accelerator_error("CUDA error: out of memory", 2),
]
RECOVERABLE = [
    RuntimeError("CUDA error: invalid configuration argument"),
    RuntimeError("CUDA error: too many resources requested for launch"),
    accelerator_error("CUDA error: invalid configuration argument", 9),
]


@pytest.mark.parametrize("exc", STICKY, ids=lambda e: str(e)[:40])
def test_sticky_errors_are_classified_sticky(exc: BaseException) -> None:
    assert classify(exc) is Fault.STICKY


@pytest.mark.parametrize("exc", OUT_OF_MEMORY, ids=lambda e: str(e)[:40] or type(e).__name__)
def test_out_of_memory_in_all_its_spellings_is_not_sticky(exc: BaseException) -> None:
    assert classify(exc) is Fault.OUT_OF_MEMORY


@pytest.mark.parametrize("exc", RECOVERABLE, ids=lambda e: str(e)[:40])
def test_a_refused_launch_is_recoverable(exc: BaseException) -> None:
    assert classify(exc) is Fault.RECOVERABLE


def test_other_errors_are_no_device_fault_and_unknown_cuda_errors_need_confirming() -> None:
    assert classify(ValueError("CUDA error: out of memory")) is Fault.OTHER  # not torch's
    assert classify(RuntimeError("shapes cannot be multiplied")) is Fault.OTHER
    assert classify(RuntimeError("CUDA error: operation not supported")) is Fault.UNKNOWN
    assert classify(accelerator_error("no text we know", 1)) is Fault.UNKNOWN


class Recorded(DeviceHealth):
    """A CPU health that records what its hook heard, and whether a watched tensor
    was still alive when memory was given back."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.alive_at_recovery: list[bool] = []
        self.watched: weakref.ref[torch.Tensor] | None = None
        super().__init__(torch.device("cpu"), self.failed.append)

    def recover(self) -> None:
        watched = self.watched
        self.alive_at_recovery.append(watched is not None and watched() is not None)
        super().recover()


def fresh() -> Recorded:
    return Recorded()


def _raise(exc: BaseException) -> None:
    raise exc


def test_a_sticky_error_fails_the_device_once_and_refuses_what_follows() -> None:
    health = fresh()
    with pytest.raises(InternalError, match="must be restarted"), health.guard("model 'm'"):
        _raise(RuntimeError("CUDA error: device-side assert triggered"))
    assert health.failure == "CUDA error: device-side assert triggered"
    with pytest.raises(InternalError, match="device failed"), health.guard("Get"):
        pytest.fail("a request ran on a failed device")
    # A second sticky error elsewhere (staging, a region) tells no one again.
    health.surfaced("staging", RuntimeError("CUDA error: an illegal memory access"))
    assert health.failed == ["CUDA error: device-side assert triggered"]


@pytest.mark.parametrize("exc", OUT_OF_MEMORY[2:4], ids=["cuda-oom", "cublas-alloc"])
def test_out_of_memory_is_resource_exhausted_and_the_device_serves_on(exc: Exception) -> None:
    health = fresh()
    exhausted = pytest.raises(ResourceExhaustedError, match=r"ran out of cpu memory \(\d+ bytes")
    with exhausted, health.guard("function 'kron'"):
        _raise(exc)
    assert health.failure is None and not health.failed
    with health.guard("identity"):
        pass  # served


def test_an_allocation_out_of_memory_is_refused_without_a_collection() -> None:
    """Staging allocates on the event loop and holds nothing to give back: its guard
    (recover=False) answers RESOURCE_EXHAUSTED without collecting or emptying caches."""
    health = fresh()
    recovered: list[bool] = []
    health.recover = lambda: recovered.append(True)  # type: ignore[method-assign]
    with pytest.raises(ResourceExhaustedError), health.guard("staging", recover=False):
        _raise(MemoryError())
    assert recovered == []
    with pytest.raises(ResourceExhaustedError), health.guard("a request"):
        _raise(MemoryError())
    assert recovered == [True]
    assert health.failure is None


def test_a_refused_launch_stays_the_requests_error_and_the_device_serves_on() -> None:
    health = fresh()
    with pytest.raises(RuntimeError, match="invalid configuration"), health.guard("m"):
        _raise(RuntimeError("CUDA error: invalid configuration argument"))
    assert health.failure is None


def test_an_unknown_cuda_error_is_confirmed_before_failing_the_device() -> None:
    # On the CPU there is nothing to synchronize: the confirmation finds it healthy.
    health = fresh()
    with pytest.raises(RuntimeError, match="not supported"), health.guard("m"):
        _raise(RuntimeError("CUDA error: operation not supported"))
    assert health.failure is None


def test_out_of_memory_recovery_runs_once_the_failed_requests_tensors_are_gone() -> None:
    """The order: leave the failed frames, drop the traceback, collect, then empty the
    cache; a tensor held only by the dead frames of the traceback is gone by then."""
    health = fresh()

    def model() -> None:
        activations = torch.ones(1 << 16)
        health.watched = weakref.ref(activations)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with pytest.raises(ResourceExhaustedError) as caught, health.guard("model 'm'"):
        model()
    assert health.alive_at_recovery == [False]
    # And the error the caller gets holds nothing of it.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ---------------------------------------------------------------- through the engine


def _probe(*_: Any) -> torch.Tensor:
    device = selected()
    return torch.tensor([-1 if device is None else (device.index or 0)])


def _fails(message: str) -> Function:
    def fn(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(message)

    return Function("fails", fn, "raises the error named")


def engine_with(**extra: Function) -> Engine:
    return Engine(torch.device("cpu"), functions={**FUNCTIONS, **extra})


def test_the_engine_reports_errors_to_its_one_hook() -> None:
    told: list[str] = []
    engine = engine_with(
        oom=_fails("CUDA error: out of memory"),
        alloc=_fails("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
        config=_fails("CUDA error: invalid configuration argument"),
        assert_=_fails("CUDA error: device-side assert triggered"),
    )
    engine.on_device_failure = told.append
    x = np.ones(3, np.float32)
    for name in ("oom", "alloc"):
        with pytest.raises(ResourceExhaustedError):
            engine.call(name, [x], {})
    with pytest.raises(Exception, match="invalid configuration") as refused:
        engine.call("config", [x], {})
    assert type(refused.value).__name__ == "InvalidArgumentError"
    assert engine.failure is None and not told  # all three: the device serves on
    with pytest.raises(InternalError, match="must be restarted"):
        engine.call("assert_", [x], {})
    assert told == ["CUDA error: device-side assert triggered"]
    with pytest.raises(InternalError, match="device failed"):
        engine.call("neg", [x], {})


def test_every_request_selects_the_engines_device_on_the_thread_that_runs_it() -> None:
    """torch's current device is per thread: each entry point selects the engine's on
    whichever worker runs it (the guard), and lets go after."""
    engine = engine_with(probe=Function("probe", _probe, "the device selected"))
    assert selected() is None
    seen: list[Any] = []
    lock = threading.Lock()

    def on_a_worker() -> None:
        out = engine.call("probe", [np.ones(1)], {})[0][1]
        grad = engine.grad_function("sum", [np.ones(2)], {})
        with lock:
            seen.append((int(out[0]), selected(), len(grad.grads)))

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(on_a_worker) for _ in range(8)]:
            future.result()
    # The CPU has no index: the probe sees the engine's device (not None) each time.
    assert seen == [(0, None, 1)] * 8
