"""Shared memory shrunk under the server: the kernel copies of
tensorwire_server.regions.copies on real /dev/shm objects, and end to end through
NVIDIA's tritonclient. A shrink fails the copy it cut short, and that request, never
the process: the server never touches a client's pages with its own loads and stores."""

from __future__ import annotations

import gc
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from conftest import TOY_MODELS
from support.regions import shared_input, shared_output, status
from tritonclient.utils import InferenceServerException

from tensorwire_server.regions import copies
from tensorwire_server.regions.copies import Copies
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(60)

SIZE = 32 << 20  # several pieces: copies this long run on helper threads too
#: The copies of the tests below that use no server, as a server's own.
COPIES = Copies()


@pytest.fixture
def shm_file() -> Iterator[Any]:
    """Makes /dev/shm objects of a given size, filled with ones; removes them after."""
    made: list[tuple[int, str]] = []

    def make(size: int = SIZE) -> int:
        path = f"/dev/shm/tw-test-{secrets.token_hex(6)}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        made.append((fd, path))
        os.ftruncate(fd, size)
        os.pwrite(fd, b"\x01" * size, 0)
        return fd

    yield make
    for fd, path in made:
        os.close(fd)
        os.unlink(path)


def mapped_now(fd: int) -> bool:
    """Whether this process still maps the object ``fd`` opened."""
    path = os.readlink(f"/proc/self/fd/{fd}")
    with open("/proc/self/maps") as maps:
        return any(path in line for line in maps)


def test_reads_and_writes_move_every_byte(shm_file: Any) -> None:
    fd = shm_file()
    payload = np.frombuffer(secrets.token_bytes(SIZE - 4196), np.uint8)
    window = copies.Window(fd, 100, SIZE - 100)  # not on a page boundary
    assert COPIES.write(fd, 100, memoryview(payload), window)
    assert os.pread(fd, payload.nbytes, 100) == payload.tobytes()
    out = COPIES.buffer(payload.nbytes)
    assert COPIES.read(fd, 100, out)
    assert np.array_equal(np.frombuffer(out, np.uint8), payload)
    assert torch.from_numpy(np.frombuffer(out, np.uint8)).sum() == int(payload.sum(dtype=np.int64))
    small = COPIES.buffer(10)  # under the huge-page size: NumPy's own memory
    assert COPIES.read(fd, 100, small) and bytes(small) == payload[:10].tobytes()


def test_a_read_past_a_shrunk_end_comes_up_short(shm_file: Any) -> None:
    fd = shm_file()
    before = COPIES.short_copies()
    os.ftruncate(fd, 8192)
    assert not COPIES.read(fd, 4096, COPIES.buffer(SIZE - 4096))
    assert COPIES.short_copies() == before + 1


def test_a_write_past_a_shrunk_end_stops_there_and_never_grows_the_object(
    shm_file: Any,
) -> None:
    fd = shm_file()
    window = copies.Window(fd, 0, SIZE)
    os.ftruncate(fd, 8192)
    data = memoryview(np.full(SIZE - 4096, 7, np.uint8))
    assert not COPIES.write(fd, 4096, data, window)
    assert os.fstat(fd).st_size == 8192  # the kernel stopped at the end
    assert os.pread(fd, 4096, 4096) == b"\x07" * 4096  # what fitted was written
    os.ftruncate(fd, SIZE)  # grown again: the same window writes all of it
    assert COPIES.write(fd, 4096, data, window)
    assert os.pread(fd, 8, SIZE - 8) == b"\x07" * 8


def test_pwritev_writes_where_there_is_no_window(shm_file: Any) -> None:
    fd = shm_file()
    window = copies.Window(fd, 0, SIZE)
    window.usable = False  # as after the kernel refused process_vm_writev (seccomp)
    data = memoryview(np.full(SIZE, 5, np.uint8))
    assert COPIES.write(fd, 0, data, window)
    assert COPIES.write(fd, 0, data[:3], None)
    assert os.pread(fd, 4, SIZE - 4) == b"\x05" * 4


def test_copies_on_several_threads_under_a_shrinking_client_end_whole_or_short(
    shm_file: Any,
) -> None:
    """A shrink while pieces of large copies run on helper threads: each copy comes
    back whole or short, and the process goes on."""
    fd = shm_file()
    window = copies.Window(fd, 0, SIZE)
    data = memoryview(np.full(SIZE, 3, np.uint8))
    out = COPIES.buffer(SIZE)
    stop = time.monotonic() + 1.5
    outcomes: set[bool] = set()

    def shrinking() -> None:
        while time.monotonic() < stop:
            os.ftruncate(fd, 4096)
            os.ftruncate(fd, SIZE)

    shrinker = threading.Thread(target=shrinking)
    shrinker.start()
    while time.monotonic() < stop:
        outcomes.add(COPIES.write(fd, 0, data, window))
        outcomes.add(COPIES.read(fd, 0, out))
    shrinker.join()
    assert outcomes <= {True, False} and os.fstat(fd).st_size == SIZE


def test_a_window_goes_with_the_last_write_through_it(shm_file: Any) -> None:
    fd = shm_file()
    window = copies.Window(fd, 0, SIZE)
    assert mapped_now(fd)
    del window
    gc.collect()
    assert not mapped_now(fd)


def start_of(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).ctypes.data)


def test_a_large_buffer_is_reused_once_nothing_uses_it() -> None:
    """A kept buffer comes back warm for the next read of its size, and never while
    an array or tensor still uses it."""
    COPIES.release_idle()
    first = COPIES.buffer(SIZE)
    tensor = torch.from_numpy(np.frombuffer(first, np.uint8))
    del first
    gc.collect()
    second = COPIES.buffer(SIZE)
    assert start_of(second) != tensor.data_ptr()  # the tensor still uses the first
    kept = {tensor.data_ptr(), start_of(second)}
    del tensor, second
    gc.collect()
    again = [COPIES.buffer(SIZE), COPIES.buffer(SIZE)]
    assert {start_of(view) for view in again} == kept


def test_idle_buffers_are_kept_up_to_their_bound_and_let_go_when_idle() -> None:
    warm = copies._Warm(keep=8 << 20)
    held = [warm.take(6 << 20), warm.take(6 << 20)]  # 6 MiB each, kept in whole 2 MiB
    assert warm.idle_bytes() == 0
    del held
    gc.collect()
    assert warm.idle_bytes() == 6 << 20  # the bound keeps one; the older one went
    warm.clear()
    assert warm.idle_bytes() == 0
    COPIES.release_idle()  # as a server's heap trimmer calls it


# ------------------------------------------------------------------ through tritonclient


@pytest.fixture(scope="module")
def server() -> Iterator[TensorwireServer]:
    engine = build_engine(Settings(device="cpu", models=TOY_MODELS))
    settings = Settings(port=0, device="cpu", allow_shared_memory=True)
    running = TensorwireServer(settings, engine)
    running.start()
    try:
        yield running
    finally:
        running.stop(None)


@pytest.fixture(scope="module")
def address(server: TensorwireServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(address) as c:
        yield c


def test_an_output_object_shrunk_while_the_model_runs_fails_that_request_only(
    client: triton.InferenceServerClient, shm_file: Any
) -> None:
    """The sleeper holds the request for a second; the output's object shrinks
    meanwhile: the request fails with FAILED_PRECONDITION, and once the object is its
    size again, the next request through the same regions is answered."""
    fds = {name: shm_file(4096) for name in ("in", "out")}
    names = {}
    for name, fd in fds.items():
        names[name] = os.readlink(f"/proc/self/fd/{fd}").removeprefix("/dev/shm/")
        client.register_system_shared_memory(names[name], f"/{names[name]}", 4096)
    try:
        os.pwrite(fds["in"], np.array(1.0).tobytes(), 0)
        sent = [shared_input("x", np.array(1.0), names["in"])]
        wanted = [shared_output("output", names["out"], 8)]
        shrink = threading.Timer(0.2, os.ftruncate, (fds["out"], 0))
        shrink.start()
        with pytest.raises(InferenceServerException) as spoiled:
            client.infer("sleeper", sent, outputs=wanted)
        shrink.join()
        assert status(spoiled) == "StatusCode.FAILED_PRECONDITION", spoiled.value.message()
        assert f"region '{names['out']}' was shrunk" in spoiled.value.message()
        assert os.fstat(fds["out"]).st_size == 0  # the server never grew it back
        os.ftruncate(fds["out"], 4096)
        os.pwrite(fds["in"], np.array(0.0).tobytes(), 0)
        client.infer("sleeper", [shared_input("x", np.array(0.0), names["in"])], outputs=wanted)
        assert os.pread(fds["out"], 8, 0) == np.array(0.0).tobytes()
    finally:
        client.unregister_system_shared_memory()
    gc.collect()
    assert not mapped_now(fds["out"])  # the region's window went with the region


def test_a_client_shrinking_its_regions_never_disturbs_another(
    server: TensorwireServer, address: str, client: triton.InferenceServerClient, shm_file: Any
) -> None:
    """Bob shrinks and regrows his input and output objects as fast as he can while he
    sends requests through them; Alice's requests through her own regions, alongside,
    all come back exact, and Bob's only ever fail with FAILED_PRECONDITION."""
    size = 1 << 20
    names, fds = {}, {}
    for who in ("alice-in", "alice-out", "bob-in", "bob-out"):
        fds[who] = shm_file(size)
        names[who] = os.readlink(f"/proc/self/fd/{fds[who]}").removeprefix("/dev/shm/")
        client.register_system_shared_memory(names[who], f"/{names[who]}", size)
    metric = server.metrics.registry.get_sample_value
    assert metric("tensorwire_shared_memory_regions", {"kind": "system"}) == 4
    payload = np.frombuffer(secrets.token_bytes(size), np.uint8)
    os.pwrite(fds["alice-in"], payload.tobytes(), 0)
    kernel = server.service.copies  # the server's own copies
    short = kernel.short_copies()
    stop = time.monotonic() + 3
    bob_codes: set[str] = set()

    def requests(who: str) -> int:
        sent = [shared_input("input", payload, names[f"{who}-in"])]
        wanted = [shared_output("output", names[f"{who}-out"], size)]
        done = 0
        with triton.InferenceServerClient(address) as mine:
            while time.monotonic() < stop:
                try:
                    mine.infer("identity", sent, outputs=wanted)
                except InferenceServerException as exc:
                    assert who == "bob", exc.message()
                    bob_codes.add(str(exc.status()))
                    continue
                if who == "alice":
                    assert os.pread(fds["alice-out"], size, 0) == payload.tobytes()
                done += 1
        return done

    def shrinking() -> None:
        while time.monotonic() < stop:
            for key in ("bob-in", "bob-out"):
                os.ftruncate(fds[key], 0)
                os.ftruncate(fds[key], size)

    workers = [threading.Thread(target=shrinking)]
    results: dict[str, int] = {}
    workers += [
        threading.Thread(target=lambda w=who: results.__setitem__(w, requests(w)))
        for who in ("alice", "bob")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    client.unregister_system_shared_memory()
    assert results["alice"] > 0
    assert bob_codes <= {"StatusCode.FAILED_PRECONDITION"}
    assert kernel.short_copies() > short  # copies cut short, not only fstat's refusals
    assert metric("tensorwire_shared_memory_short_copies_total") == kernel.short_copies()
    assert metric("tensorwire_shared_memory_regions", {"kind": "system"}) == 0
