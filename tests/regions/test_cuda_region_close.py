"""When a CUDA shared-memory region's handle closes (regions/cuda.py's finalizer), on
the CPU: at once when no copy of its own is in flight, without a device-wide
synchronize on the thread that dropped it, and always, even when something fails."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import torch

from tensorwire_server.device.faults import DeviceHealth
from tensorwire_server.regions import cuda


class Driver(cuda._Driver):
    """The driver's close as the finalizer sees it, without libcuda (none here)."""

    def __init__(self, fails: bool = False) -> None:  # no cuInit: nothing to load
        self.closed: list[tuple[int, int, str]] = []
        self.fails = fails

    def close(self, address: int, device: int) -> None:
        self.closed.append((address, device, threading.current_thread().name))
        if self.fails:
            raise cuda._DriverError("cuIpcCloseMemHandle: invalid value (CUresult 1)")


def health() -> DeviceHealth:
    return DeviceHealth(torch.device("cpu"))


def test_a_region_without_copies_in_flight_closes_at_once_on_the_dropping_thread() -> None:
    driver = Driver()
    # Before: torch.cuda.synchronize(device) first, which waits for the whole device
    # (and here, without CUDA, raised, so the handle was never closed).
    cuda._close(driver, 0x7000, 1, cuda.Uses(), health())
    assert driver.closed == [(0x7000, 1, threading.current_thread().name)]


def test_a_failing_close_is_logged_not_raised_into_whoever_dropped_the_region(
    caplog: pytest.LogCaptureFixture,
) -> None:
    driver = Driver(fails=True)
    with caplog.at_level(logging.WARNING, logger=cuda.__name__):
        cuda._close(driver, 0x8000, 0, cuda.Uses(), health())
    assert driver.closed and "invalid value" in caplog.text


def test_the_finalizer_runs_when_the_last_tensor_over_the_memory_goes() -> None:
    driver = Driver()
    memory: Any = cuda._DeviceMemory(driver, 0x9000, 64, 0, health())
    assert memory.__cuda_array_interface__["shape"] == (64,)
    del memory  # what the table's unregister, or the server's stop, comes to
    assert driver.closed == [(0x9000, 0, threading.current_thread().name)]
