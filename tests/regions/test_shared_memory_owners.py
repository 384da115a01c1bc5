"""Whose shared-memory regions are whose: each token's its own, a session's its own
and gone with the session, and one name per region across both kinds, as Triton
has it."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from support.kserve import X, same
from support.regions import (
    ALICE,
    BOB,
    PEEK,
    engine,
    fds_on,
    regions,
    serving,
    shared_input,
    status,
)
from tritonclient.utils import InferenceServerException

from tensorwire._transport.methods import method_path
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.protocol import SESSION_KEY
from tensorwire_server.engine.engine import Engine
from tensorwire_server.regions.copies import Copies
from tensorwire_server.regions.system import SharedMemory
from tensorwire_server.regions.table import RegionExistsError, RegionTable

pytestmark = pytest.mark.timeout(60)

__all__ = ["engine", "regions"]  # fixtures, shared with the other shared-memory tests


def test_regions_belong_to_the_token_that_registered_them(engine: Engine, regions: Any) -> None:
    tokens = f"alice infer {ALICE};bob infer {BOB};peek tensors {PEEK}"
    (mine, alices), (_, bobs) = regions(X.nbytes), regions(X.nbytes)
    shm.set_shared_memory_region(mine, [X])
    with serving(engine, allow_shared_memory=True, tokens=tokens) as address:
        with triton.InferenceServerClient(address) as c:
            alice = {"authorization": f"Bearer {ALICE}"}
            bob = {"authorization": f"Bearer {BOB}"}
            c.register_system_shared_memory("r", f"/{alices}", X.nbytes, headers=alice)
            assert not c.get_system_shared_memory_status(headers=bob).regions
            with pytest.raises(InferenceServerException) as hidden:
                c.get_system_shared_memory_status("r", headers=bob)
            assert status(hidden) == "StatusCode.NOT_FOUND"
            with pytest.raises(InferenceServerException) as unused:
                c.infer("mlp", [shared_input("input", X, "r")], headers=bob)
            assert status(unused) == "StatusCode.NOT_FOUND"
            c.unregister_system_shared_memory("r", headers=bob)  # not bob's: nothing happens
            c.unregister_system_shared_memory(headers=bob)
            c.register_system_shared_memory("r", f"/{bobs}", X.nbytes, headers=bob)  # his own
            assert c.get_system_shared_memory_status(headers=bob).regions["r"].key == f"/{bobs}"
            result = c.infer("identity", [shared_input("input", X, "r")], headers=alice)
            assert same(result.as_numpy("output"), X)  # still alice's region
            assert c.get_system_shared_memory_status(headers=alice).regions["r"].key == f"/{alices}"
            with pytest.raises(InferenceServerException) as denied:
                c.register_system_shared_memory(
                    "p", f"/{alices}", 8, headers={"authorization": f"Bearer {PEEK}"}
                )
            assert status(denied) == "StatusCode.PERMISSION_DENIED"
            with pytest.raises(InferenceServerException) as anonymous:
                c.get_system_shared_memory_status()
            assert status(anonymous) == "StatusCode.UNAUTHENTICATED"
        assert fds_on(alices) == fds_on(bobs) == 1
    assert fds_on(alices) == fds_on(bobs) == 0


def _open_session(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        opened = channel.unary_unary(method_path("OpenSession"))(b"", timeout=10)
    return pb.OpenSessionResponse.FromString(opened).session


def test_regions_registered_in_a_session_are_its_own_and_go_with_it(
    engine: Engine, regions: Any
) -> None:
    (mine, key), (_, other) = regions(X.nbytes), regions(X.nbytes)
    shm.set_shared_memory_region(mine, [X])
    with (
        serving(engine, allow_shared_memory=True) as address,
        triton.InferenceServerClient(address) as c,
    ):
        session = _open_session(address)
        in_session = {SESSION_KEY: session}
        c.register_system_shared_memory("r", f"/{key}", X.nbytes, headers=in_session)
        c.register_system_shared_memory("r", f"/{other}", X.nbytes)  # the token's own "r"
        assert c.get_system_shared_memory_status(headers=in_session).regions["r"].key == f"/{key}"
        assert c.get_system_shared_memory_status().regions["r"].key == f"/{other}"
        result = c.infer("identity", [shared_input("input", X, "r")], headers=in_session)
        assert same(result.as_numpy("output"), X)
        assert fds_on(key) == 1
        with grpc.insecure_channel(address) as channel:
            channel.unary_unary(method_path("CloseSession"))(
                b"", metadata=((SESSION_KEY, session),), timeout=10
            )
        assert fds_on(key) == 0  # let go with the session
        assert fds_on(other) == 1  # the token's stays
        with pytest.raises(InferenceServerException) as gone:
            c.get_system_shared_memory_status(headers=in_session)
        assert status(gone) == "StatusCode.NOT_FOUND"
        assert "session" in gone.value.message()
        c.unregister_system_shared_memory()


def test_a_session_that_expires_lets_its_regions_go(engine: Engine, regions: Any) -> None:
    """A client that dies holding regions it registered in a session leaves them only
    until the session expires."""
    key = regions(X.nbytes)[1]
    with (
        serving(engine, allow_shared_memory=True, session_ttl=0.3) as address,
        triton.InferenceServerClient(address) as c,
    ):
        in_session = {SESSION_KEY: _open_session(address)}
        c.register_system_shared_memory("r", f"/{key}", X.nbytes, headers=in_session)
        assert fds_on(key) == 1
        deadline = time.monotonic() + 10
        while fds_on(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds_on(key) == 0
        assert not c.get_system_shared_memory_status().regions


def test_region_names_are_one_namespace_across_both_kinds(regions: Any) -> None:
    # Two system front ends on one table stand for the two kinds: CUDA regions need a
    # GPU (their own tests run the same check through CudaSharedMemoryRegister there;
    # test_regions_table.py puts both kinds in one table).
    names = RegionTable(True, 8, 1 << 20, 1 << 20)
    first, second = SharedMemory(names, Copies()), SharedMemory(names, Copies())
    name = regions(64)[1]
    first.register("", "taken", f"/{name}", 0, 64)
    with pytest.raises(RegionExistsError, match="registered already, as a system"):
        second.register("", "taken", f"/{name}", 0, 64)
    second.register("bob", "taken", f"/{name}", 0, 64)  # another caller's namespace
    names.close()
