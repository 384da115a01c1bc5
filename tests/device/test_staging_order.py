"""The order of a streamed request's copies to the device and its stager's close, on
the CPU: the data port's thread lands chunks while the event loop may close the
stager (the stream was cut), and no copy may be launched into buffers already let go.
"""

from __future__ import annotations

import threading

from tensorwire_server.device.staging import CopyBatches


def test_copies_go_in_batches_and_the_last_bytes_go_at_once() -> None:
    launched: list[tuple[int, int, int]] = []
    batches = CopyBatches(lambda i, a, b: launched.append((i, a, b)), batch=10)
    batches.add(25)
    batches.add(3)
    for stop in (4, 9, 12, 15, 22, 25, 25):
        batches.landed(0, stop)
    batches.landed(1, 3)  # a buffer smaller than a batch goes once it is full
    assert launched == [(0, 0, 12), (0, 12, 22), (0, 22, 25), (1, 0, 3)]


def test_close_waits_for_a_copy_being_launched_and_none_is_launched_after() -> None:
    events: list[str] = []
    started, release = threading.Event(), threading.Event()

    def launch(index: int, start: int, stop: int) -> None:
        events.append(f"launch {start}-{stop}")
        started.set()
        release.wait(30)
        events.append("launched")

    batches = CopyBatches(launch, batch=4)
    batches.add(16)
    lander = threading.Thread(target=batches.landed, args=(0, 8))
    lander.start()
    assert started.wait(30)

    def close() -> None:
        assert batches.close()
        events.append("closed")

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(0.2)  # room for a close that does not wait to finish first (it must not)
    release.set()
    lander.join(30)
    closer.join(30)
    assert events == ["launch 0-8", "launched", "closed"]
    batches.landed(0, 16)  # a chunk landing after the close: nothing is copied
    assert events[-1] == "closed"
    assert not batches.close()  # closing twice is nothing
