"""The region table and the kernel copies, as one server owns them: both kinds of
region in one table under one lock (one name registered as system and as CUDA by many
threads at once is taken exactly once), and each server's copies its own (two servers
in one process report only theirs)."""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

import pytest
import torch
from support import regions as shared_memory
from support.regions import fds_on

from tensorwire.errors import ResourceExhaustedError
from tensorwire_server.engine.engine import Engine
from tensorwire_server.regions.copies import Copies
from tensorwire_server.regions.cuda import CudaRegionStatus, CudaSharedMemory, _CudaRegion
from tensorwire_server.regions.system import SharedMemory
from tensorwire_server.regions.table import RegionExistsError, RegionTable
from tensorwire_server.server import TensorwireServer
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

# The fixtures these tests take, shared with the other shared-memory tests.
engine = shared_memory.engine
regions = shared_memory.regions

#: Threads registering one name at once, half of them as each kind.
THREADS = 16


def _cuda_region(name: str, byte_size: int) -> _CudaRegion:
    """A CUDA-kind entry as CudaSharedMemory.register adds it, over host memory in
    place of an opened IPC handle (the table never looks inside a region)."""
    return _CudaRegion(
        CudaRegionStatus(name, 0, byte_size), torch.zeros(byte_size, dtype=torch.uint8)
    )


def test_one_name_registered_as_both_kinds_by_many_threads_is_taken_once(regions: Any) -> None:
    """Many threads register one name at the same moment, half as a system region
    (the real path: a /dev/shm object opened and mapped) and half as a CUDA region
    (the table's reserve, the handle's opening, the table's add, as
    CudaSharedMemory.register does them): exactly one succeeds, every other gets
    ALREADY_EXISTS, and the limits count one region."""
    key = regions(64)[1]
    table = RegionTable(True, 64, 1 << 20, 1 << 20)
    system, cuda = SharedMemory(table, Copies()), CudaSharedMemory(table)

    def as_cuda(owner: str, name: str) -> None:
        table.reserve(owner, name, 64)
        time.sleep(0.01)  # cuIpcOpenMemHandle: the others pass reserve meanwhile
        region = _cuda_region(name, 64)
        table.add(owner, region)

    rounds = 6
    for round_ in range(rounds):
        name = f"dual-{round_}"
        start = threading.Barrier(THREADS)
        outcomes: list[tuple[str, BaseException | None]] = []

        def register(
            kind: str,
            name: str = name,
            start: threading.Barrier = start,
            outcomes: list[tuple[str, BaseException | None]] = outcomes,
        ) -> None:
            start.wait()
            try:
                if kind == "system":
                    system.register("mallory", name, f"/{key}", 0, 64)
                else:
                    as_cuda("mallory", name)
            except Exception as refused:  # the outcome under test
                outcomes.append((kind, refused))  # list.append: one step under the GIL
            else:
                outcomes.append((kind, None))

        kinds = ["system", "cuda"] * (THREADS // 2)
        threads = [threading.Thread(target=register, args=(k,)) for k in kinds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        won = [kind for kind, outcome in outcomes if outcome is None]
        lost = [outcome for _, outcome in outcomes if outcome is not None]
        assert len(outcomes) == THREADS and len(won) == 1, (round_, outcomes)
        assert all(isinstance(exc, RegionExistsError) for exc in lost), lost
        assert all("registered already, as a" in str(exc) for exc in lost)
        noun = "system" if won[0] == "system" else "CUDA"
        assert all(f"as a {noun} shared-memory region" in str(exc) for exc in lost)
        assert system.has("mallory", name) == (won[0] == "system")
        assert cuda.has("mallory", name) == (won[0] == "cuda")
    assert table.held("mallory") == (rounds, 64 * rounds)
    assert system.count() + cuda.count() == rounds
    assert fds_on(key) == system.count()  # each losing system registration closed its own
    table.close()
    assert table.held("mallory") == (0, 0) and table.bytes == 0
    assert system.count() == cuda.count() == 0 and fds_on(key) == 0


def test_both_kinds_share_one_table_per_caller(regions: Any) -> None:
    """One table, both kinds: unregistering, listing and counting one kind leave the
    other alone; forgetting an owner (its session ended) lets both go; the limits
    count both."""
    key = regions(64)[1]
    table = RegionTable(True, 2, 1 << 20, 1 << 20)
    system, cuda = SharedMemory(table, Copies()), CudaSharedMemory(table)
    system.register("alice", "host", f"/{key}", 0, 64)
    table.add("alice", _cuda_region("gpu", 32))
    with pytest.raises(ResourceExhaustedError, match="max_shared_memory_regions"):
        table.reserve("alice", "third", 1)  # two regions, one of each kind: the limit
    assert [s.name for s in system.status("alice", "")] == ["host"]
    system.unregister("alice", "gpu")  # a CUDA region: not the system kind's to drop
    system.unregister("alice", "")  # all of the system kind, and only those
    assert cuda.has("alice", "gpu") and not system.has("alice", "host")
    assert table.held("alice") == (1, 32) and fds_on(key) == 0
    system.register("alice", "host", f"/{key}", 0, 64)
    table.forget("alice")
    assert table.held("alice") == (0, 0) and system.count() == cuda.count() == 0
    assert fds_on(key) == 0


def _short_copy(copies: Copies) -> None:
    """One copy cut short through ``copies``: a read past an object's end."""
    fd = os.memfd_create("tw-short")
    try:
        os.ftruncate(fd, 4096)
        assert not copies.read(fd, 0, copies.buffer(8192))
    finally:
        os.close(fd)


def test_two_servers_in_one_process_report_only_their_own_copies(engine: Engine) -> None:
    """Each server's copies are its own: a copy one server cuts short shows in its
    metric only, and the warm buffers one keeps are not the other's (whose heap
    trimmer lets only its own go)."""
    settings = Settings(port=0, device="cpu", allow_shared_memory=True)
    first, second = TensorwireServer(settings, engine), TensorwireServer(settings, engine)
    first.start()
    second.start()
    try:
        assert first.service.copies is not second.service.copies
        metric = "tensorwire_shared_memory_short_copies_total"

        def short(server: TensorwireServer) -> float | None:
            return server.metrics.registry.get_sample_value(metric)

        assert short(first) == short(second) == 0
        _short_copy(first.service.copies)
        _short_copy(first.service.copies)
        _short_copy(second.service.copies)
        assert (short(first), short(second)) == (2, 1)
        big = first.service.copies.buffer(8 << 20)  # large: one of its warm buffers
        del big
        gc.collect()
        assert first.service.copies.idle_bytes() == 8 << 20
        assert second.service.copies.idle_bytes() == 0
        second.service.copies.release_idle()
        assert first.service.copies.idle_bytes() == 8 << 20
        first.service.copies.release_idle()
        assert first.service.copies.idle_bytes() == 0
        assert (short(first), short(second)) == (2, 1)
    finally:
        first.stop(None)
        second.stop(None)
