"""The server gives freed heap memory back once idle, and never while requests run."""

from __future__ import annotations

import threading
import time

from tensorwire_server.transport.heap import HeapTrimmer, _malloc_trim


def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = _malloc_trim()
    assert trim is not None  # the CI machines run glibc
    assert trim(0) in (0, 1)


def test_trims_once_per_quiet_moment_and_never_while_busy() -> None:
    trimmed = threading.Event()
    calls: list[float] = []

    def trim(pad: int) -> int:
        calls.append(time.monotonic())
        trimmed.set()
        return 1

    heap = HeapTrimmer(idle_seconds=0.2, trim=trim)
    try:
        time.sleep(0.5)
        assert calls == []  # nothing ran yet: nothing to give back
        heap.busy()
        time.sleep(0.5)
        assert calls == []  # a request is running
        ended = time.monotonic()
        heap.idle()
        assert trimmed.wait(5)
        assert calls[0] - ended >= 0.2
        time.sleep(0.5)
        assert len(calls) == 1  # idle since: trimmed once, not again and again
        heap.busy()  # a request that ends before the quiet moment does not count twice
        heap.idle()
        heap.busy()
        time.sleep(0.1)
        heap.idle()
        time.sleep(0.6)
        assert len(calls) == 2
    finally:
        heap.stop()


def test_memory_kept_for_reuse_is_released_before_each_trim() -> None:
    order: list[str] = []
    trimmed = threading.Event()

    def trim(pad: int) -> int:
        order.append("trim")
        trimmed.set()
        return 1

    heap = HeapTrimmer(idle_seconds=0.1, trim=trim, release=[lambda: order.append("release")])
    try:
        heap.busy()
        heap.idle()
        assert trimmed.wait(5)
        assert order == ["release", "trim"]
    finally:
        heap.stop()


def test_trim_now_runs_at_once_without_waiting_for_quiet() -> None:
    """``trim`` (the gate's, after an oversize public message) gives pages back now,
    busy or not, and leaves the idle watch as it was."""
    calls: list[int] = []
    heap = HeapTrimmer(idle_seconds=60, trim=lambda pad: calls.append(pad))
    try:
        heap.busy()
        heap.trim()
        assert calls == [0]
        heap.idle()
        assert calls == [0]  # the idle trim waits its 60 s as ever
    finally:
        heap.stop()
