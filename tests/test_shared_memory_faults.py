"""Shared memory shrunk under the server: mappings of files a client can truncate at
any moment (tensorwire_server.mapped), on real /dev/shm objects, and end to end through
NVIDIA's tritonclient: a fault in one of them fails what used it, never the process;
a fault anywhere else still ends the process as it did before."""

from __future__ import annotations

import gc
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from conftest import TOY_MODELS
from test_shared_memory import shared_input, shared_output, status
from tritonclient.utils import InferenceServerException

from tensorwire_server import mapped
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not mapped.SUPPORTED, reason="mappings are used on Linux x86_64/aarch64"),
]

SIZE = 32 << 20


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


def test_a_write_past_a_shrunk_end_fails_the_mapping_not_the_process(shm_file: Any) -> None:
    fd, other_fd = shm_file(), shm_file()
    target = mapped.Mapping(fd, 4096, SIZE - 4096, private=False)
    other = mapped.Mapping(other_fd, 0, SIZE, private=False)
    source = np.full(SIZE - 4096, 7, np.uint8)
    np.copyto(target.array, source)  # a large copy: numpy lets go of the GIL
    assert not target.shrunk
    assert os.pread(fd, 4, 4096) == b"\x07" * 4
    os.ftruncate(fd, 8192)
    np.copyto(target.array, source)
    assert target.shrunk
    target.array[:16] = 3  # a small store, with the GIL held: zeroed memory takes it
    assert os.fstat(fd).st_size == 8192  # the server never grows a client's object
    assert not other.shrunk and int(other.array.min()) == 1  # the other mapping is intact


def test_a_shrink_while_threads_copy_spoils_only_that_mapping(shm_file: Any) -> None:
    fd = shm_file()
    target = mapped.Mapping(fd, 0, SIZE, private=False)
    source = np.full(SIZE, 9, np.uint8)
    shrink = threading.Timer(0.02, os.ftruncate, (fd, 0))
    shrink.start()
    deadline = time.monotonic() + 10
    while not target.shrunk and time.monotonic() < deadline:
        np.copyto(target.array, source)
    shrink.join()
    assert target.shrunk


def test_a_torch_kernel_on_a_shrunk_private_mapping_finishes(shm_file: Any) -> None:
    fd = shm_file()
    mapping = mapped.Mapping(fd, 0, SIZE, private=True)
    tensor = torch.from_numpy(mapping.array).view(torch.float32)
    os.ftruncate(fd, 0)
    # Summed by torch's own threads, none of which the interpreter knows.
    assert float(tensor.sum()) == 0.0
    assert mapping.shrunk


def test_a_private_mapping_reads_the_file_and_keeps_its_writes(shm_file: Any) -> None:
    fd = shm_file()
    mapping = mapped.Mapping(fd, 100, 5000, private=True)
    assert mapping.array.nbytes == 5000 and int(mapping.array.min()) == 1
    mapping.array[:] = 5
    assert os.pread(fd, 5000, 100) == b"\x01" * 5000


def test_the_pages_go_with_the_last_view(shm_file: Any) -> None:
    gc.collect()
    before = mapped.live()
    mapping = mapped.Mapping(shm_file(), 0, SIZE, private=True)
    tensor = torch.from_numpy(mapping.array[4096:].view(np.int32))
    del mapping
    gc.collect()
    assert mapped.live() == before + 1  # the tensor still reads them
    assert int(tensor[0]) == 0x01010101
    del tensor
    gc.collect()
    assert mapped.live() == before


FOREIGN_FAULT = """
import faulthandler, mmap, os, sys
from tensorwire_server import mapped
faulthandler.enable()
fd = os.open(sys.argv[1], os.O_RDWR)
ours = mapped.Mapping(fd, 0, 8192, private=False)
os.ftruncate(fd, 0)
ours.array[:] = 1
assert ours.shrunk
os.ftruncate(fd, 8192)
theirs = mmap.mmap(fd, 8192)
os.ftruncate(fd, 0)
print("reading", flush=True)
theirs[0]
print("survived", flush=True)
"""


def test_a_fault_outside_the_mappings_still_ends_the_process(shm_file: Any) -> None:
    fd = shm_file(8192)
    path = os.readlink(f"/proc/self/fd/{fd}")
    done = subprocess.run(
        [sys.executable, "-c", FOREIGN_FAULT, path], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == -signal.SIGBUS, done.stderr
    assert "reading" in done.stdout and "survived" not in done.stdout
    assert "Bus error" in done.stderr  # faulthandler, which was there before, had it


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


@pytest.mark.parametrize("output_in", ["region", "response"])
def test_an_input_shrunk_while_the_model_runs_fails_that_request_only(
    client: triton.InferenceServerClient, shm_file: Any, output_in: str
) -> None:
    """The sleeper reads its input, sleeps, and returns it: the object shrinks once
    the server has mapped the input, so the model's read or the output's copy (into a
    region, or into the response) faults."""
    gc.collect()
    before = mapped.live()
    seconds = np.array(1.0)
    fds = {name: shm_file(4096) for name in ("in", "out")}
    names = {}
    for name, fd in fds.items():
        names[name] = os.readlink(f"/proc/self/fd/{fd}").removeprefix("/dev/shm/")
        client.register_system_shared_memory(names[name], f"/{names[name]}", 4096)
    try:
        os.pwrite(fds["in"], seconds.tobytes(), 0)
        sent = [shared_input("x", seconds, names["in"])]
        wanted = [shared_output("output", names["out"], 8)] if output_in == "region" else None

        def shrink_once_mapped() -> None:
            deadline = time.monotonic() + 30
            while mapped.live() == before and time.monotonic() < deadline:
                time.sleep(0.001)  # the server (in this process) maps the request's input
            os.ftruncate(fds["in"], 0)

        shrink = threading.Thread(target=shrink_once_mapped)
        shrink.start()
        with pytest.raises(InferenceServerException) as spoiled:
            client.infer("sleeper", sent, outputs=wanted)
        shrink.join()
        assert status(spoiled) == "StatusCode.FAILED_PRECONDITION", spoiled.value.message()
        assert f"region '{names['in']}' was shrunk while it was being read" in (
            spoiled.value.message()
        )
        os.ftruncate(fds["in"], 4096)
        os.pwrite(fds["in"], np.array(0.0).tobytes(), 0)
        result = client.infer("sleeper", [shared_input("x", np.array(0.0), names["in"])])
        assert float(result.as_numpy("output")) == 0.0
    finally:
        client.unregister_system_shared_memory()
    gc.collect()
    assert mapped.live() == before  # every request's input mapping, and the region's, gone


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
    faults = mapped.faults()
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
    assert mapped.faults() > faults  # the handler took most of them, not only fstat
    assert metric("tensorwire_shared_memory_faults_total") == mapped.faults()
    assert metric("tensorwire_shared_memory_regions", {"kind": "system"}) == 0
