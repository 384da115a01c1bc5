"""One tenant must not take everything: attacks on the per-identity limits (sessions,
session bytes, shared-memory regions and their bytes, through sessions too), the race
of one region name registered as both kinds at once, the status codes of CUDA shared
memory on a server without CUDA, and a train-only token that must be able to train.

Each attack is made by one token ("mallory") against a real server over real gRPC;
another token ("alice") must still be served afterwards."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from support.regions import engine, fds_on, regions, serving, status
from test_sessions import Raw, code_of
from tritonclient.utils import InferenceServerException

from tensorwire import Client, PermissionDeniedError, ResourceExhaustedError
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.protocol import SESSION_KEY
from tensorwire_server.core.sessions import Ledger, Session, Sessions, storage_bytes
from tensorwire_server.regions.copies import Copies
from tensorwire_server.regions.system import SharedMemory
from tensorwire_server.regions.table import RegionExistsError, RegionTable
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

__all__ = ["engine", "regions"]  # fixtures

MALLORY, ALICE, BOB = (secrets.token_urlsafe(24) for _ in range(3))
TRAINER = secrets.token_urlsafe(24)  # a token with the train scope alone
INFERRER = secrets.token_urlsafe(24)  # one with infer alone
TOKENS = (
    f"mallory * {MALLORY};alice * {ALICE};bob * {BOB};"
    f"trainer train {TRAINER};inferrer infer {INFERRER}"
)


def _details(exc: Any) -> str:
    """A gRPC error's message."""
    return str(exc.details())


def _bearer(token: str, session: str = "") -> dict[str, str]:
    headers = {"authorization": f"Bearer {token}"}
    if session:
        headers[SESSION_KEY] = session
    return headers


@contextmanager
def _raw(address: str, token: str) -> Iterator[list[Raw]]:
    """Raw stubs of ``token``, each opened on a session of its own as the test asks
    (``opened.append(Raw(...).open())``), all closed after."""
    opened: list[Raw] = []
    try:
        yield opened
    finally:
        for raw in opened:
            raw.close()


def _open_until_refused(address: str, token: str, opened: list[Raw], most: int) -> grpc.RpcError:
    """Open sessions as ``token`` until the server refuses one (at most ``most``)."""
    for _ in range(most):
        raw = Raw(address, token)
        try:
            opened.append(raw.open())
        except grpc.RpcError as exc:
            raw.close()
            return exc
    raise AssertionError(f"{most} sessions opened, none refused")


# ---------------------------------------------------------------- sessions


def test_one_token_cannot_take_every_session(engine: Any) -> None:
    """The attack: one token opens sessions until the server refuses, which used to
    be all 64 of them for the whole TTL. Now its share (16 by default) is all it gets,
    and the others are left for other tokens, below the server's cap."""
    defaults = Settings()
    share, cap = defaults.max_sessions_per_token, defaults.max_sessions
    assert share * 4 <= cap  # room for several tenants by default
    with (
        serving(engine, tokens=TOKENS, max_sessions=share + 2) as address,
        _raw(address, MALLORY) as mallory,
        _raw(address, ALICE) as alice,
    ):
        refused = _open_until_refused(address, MALLORY, mallory, cap + 1)
        assert len(mallory) == share
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        details = _details(refused)
        assert "token 'mallory'" in details and "max_sessions_per_token" in details
        # Another token still gets sessions, up to the server's cap, which still holds.
        server_full = _open_until_refused(address, ALICE, alice, cap + 1)
        assert len(alice) == 2
        assert "max_sessions" in _details(server_full)
        # A session mallory closes is one more for whoever asks next.
        mallory[-1]("CloseSession", pb.CloseSessionRequest())
        alice.append(Raw(address, ALICE).open())
        assert alice[-1].put(np.ones(4, np.float32)).shape == (4,)


def test_one_token_cannot_exceed_its_bytes_across_sessions(engine: Any) -> None:
    """The attack: fill several sessions, each within its quota, to hold far more than
    one session may. The token's sessions together stop at session_bytes_per_token;
    every session together at max_session_bytes."""
    quota, per_token, total = 1 << 20, 2 << 20, 3 << 20
    limits = {
        "session_quota_bytes": quota,
        "session_bytes_per_token": per_token,
        "max_session_bytes": total,
    }
    block = np.zeros(100_000, np.float64)  # 800 kB: one fits a session's quota
    with (
        serving(engine, tokens=TOKENS, **limits) as address,
        _raw(address, MALLORY) as mallory,
        _raw(address, ALICE) as alice,
        _raw(address, BOB) as bob,
    ):
        for _ in range(3):
            mallory.append(Raw(address, MALLORY).open())
        mallory[0].put(block)
        mallory[1].put(block)
        with pytest.raises(grpc.RpcError) as refused:
            mallory[2].put(block)  # within this session's quota, past the token's share
        assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = _details(refused.value)
        assert "token 'mallory'" in details and f"session_bytes_per_token ({per_token}" in details
        with pytest.raises(grpc.RpcError) as kept:
            mallory[2].call("mul", np.ones(100_000), 2.0, keep=True)  # kept results count
        assert code_of(kept) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another token is served meanwhile, up to the server's cap over everyone.
        alice.append(Raw(address, ALICE).open())
        alice[0].put(block)
        bob.append(Raw(address, BOB).open())
        with pytest.raises(grpc.RpcError) as full:
            bob[0].put(block)
        assert code_of(full) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"max_session_bytes ({total}" in _details(full.value)
        # What a session frees, or closing it, gives its bytes back at once.
        mallory[1]("CloseSession", pb.CloseSessionRequest())
        held = bob[0].put(block)
        np.testing.assert_array_equal(bob[0].get(held), block)
        info = mallory[0]("Info", pb.InfoRequest()).sessions
        assert info.bytes == 3 * block.nbytes


# ---------------------------------------------------------------- shared-memory regions


def _session(address: str, token: str) -> str:
    with grpc.insecure_channel(address) as channel:
        opened = channel.unary_unary(
            "/tensorwire.v1.TensorService/OpenSession",
            response_deserializer=pb.OpenSessionResponse.FromString,
        )(b"", metadata=tuple(_bearer(token).items()), timeout=10)
    return str(opened.session)


def test_sessions_do_not_multiply_a_tokens_regions(engine: Any, regions: Any) -> None:
    """The attack: register max_shared_memory_regions regions in each of many
    sessions (each used to be an owner of its own: 4 sessions held 256 regions against
    a limit of 64). A token's regions count together, its sessions' included."""
    handle, key = regions(64)
    shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.float32)])
    limit = 4
    with (
        serving(
            engine, tokens=TOKENS, allow_shared_memory=True, max_shared_memory_regions=limit
        ) as address,
        triton.InferenceServerClient(address) as c,
    ):
        sessions = [_session(address, MALLORY) for _ in range(3)]
        c.register_system_shared_memory("own", f"/{key}", 64, headers=_bearer(MALLORY))
        registered, refused = 1, None
        for index, session in enumerate(sessions):
            for n in range(limit):
                try:
                    c.register_system_shared_memory(
                        f"r{n}", f"/{key}", 64, headers=_bearer(MALLORY, session)
                    )
                    registered += 1
                except InferenceServerException as exc:
                    refused = (index, exc)
                    break
            if refused:
                break
        assert registered == limit and refused is not None
        assert str(refused[1].status()) == "StatusCode.RESOURCE_EXHAUSTED"
        message = refused[1].message()
        assert "token 'mallory'" in message and "max_shared_memory_regions" in message
        assert "sessions' included" in message
        assert fds_on(key) == limit
        # Another token registers its own, whatever mallory holds.
        for n in range(limit):
            c.register_system_shared_memory(f"a{n}", f"/{key}", 64, headers=_bearer(ALICE))
        # Closing a session gives its regions back to the token at once.
        with grpc.insecure_channel(address) as channel:
            channel.unary_unary("/tensorwire.v1.TensorService/CloseSession")(
                b"", metadata=tuple(_bearer(MALLORY, sessions[0]).items()), timeout=10
            )
        c.register_system_shared_memory("again", f"/{key}", 64, headers=_bearer(MALLORY))
        c.unregister_system_shared_memory(headers=_bearer(MALLORY))
        c.unregister_system_shared_memory(headers=_bearer(ALICE))
        for session in sessions[1:]:
            c.unregister_system_shared_memory(headers=_bearer(MALLORY, session))
    assert fds_on(key) == 0


def _sparse(size: int) -> str:
    """A POSIX shared-memory object of ``size`` bytes that holds no memory (sparse)."""
    key = f"tw-test-sparse-{secrets.token_hex(6)}"
    fd = os.open(f"/dev/shm/{key}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return key


def test_a_huge_sparse_region_takes_only_its_tokens_share(engine: Any) -> None:
    """The attack: one 16 GiB sparse object, registered whole, used to take the whole
    server's max_shared_memory_bytes and lock every other token out. Now a token's
    regions stop at shared_memory_bytes_per_token (4 GiB of 16 by default)."""
    defaults = Settings()
    share, cap = defaults.shared_memory_bytes_per_token, defaults.max_shared_memory_bytes
    assert share * 4 <= cap
    key = _sparse(cap)
    try:
        with (
            serving(engine, tokens=TOKENS, allow_shared_memory=True) as address,
            triton.InferenceServerClient(address) as c,
        ):
            mallory = _bearer(MALLORY)
            with pytest.raises(InferenceServerException) as whole:
                c.register_system_shared_memory("all", f"/{key}", cap, headers=mallory)
            assert status(whole) == "StatusCode.RESOURCE_EXHAUSTED"
            message = whole.value.message()
            assert "token 'mallory'" in message
            assert f"shared_memory_bytes_per_token ({share})" in message
            assert fds_on(key) == 0  # refused before the object was opened
            # Its share, in one region and then through a session: no more.
            c.register_system_shared_memory("half", f"/{key}", share // 2, headers=mallory)
            in_session = _bearer(MALLORY, _session(address, MALLORY))
            c.register_system_shared_memory("half", f"/{key}", share // 2, headers=in_session)
            with pytest.raises(InferenceServerException) as more:
                c.register_system_shared_memory("one", f"/{key}", 1, headers=in_session)
            assert status(more) == "StatusCode.RESOURCE_EXHAUSTED"
            assert "token 'mallory'" in more.value.message()
            # The rest of the server's budget is others' to use.
            for name in ("alice", "bob"):
                token = ALICE if name == "alice" else BOB
                c.register_system_shared_memory(name, f"/{key}", share, headers=_bearer(token))
            for token in (MALLORY, ALICE, BOB):
                c.unregister_system_shared_memory(headers=_bearer(token))
            c.unregister_system_shared_memory(headers=in_session)
            assert fds_on(key) == 0
    finally:
        os.unlink(f"/dev/shm/{key}")


# ---------------------------------------------------------------- one name, both kinds


class _SlowTable(RegionTable):
    """A table whose registrations take a while between their checks and their
    insert (opening and mapping a large object does), to widen the window."""

    def add(self, owner: str, region: Any) -> None:
        time.sleep(0.05)
        super().add(owner, region)


class _SimulatedCuda:
    """The CUDA kind as the table sees it, without a GPU: the checks and the insert
    are the table's (as CudaSharedMemory.register calls them); opening the IPC
    handle, which the driver takes a while to do, is a sleep."""

    def __init__(self, table: RegionTable) -> None:
        self.table = table

    def register(self, owner: str, name: str, byte_size: int) -> None:
        self.table.on()
        self.table.reserve(owner, name, byte_size)
        time.sleep(0.05)  # cuIpcOpenMemHandle
        self.table.add(owner, _Opened(_Status(name, byte_size)))


class _Status:
    def __init__(self, name: str, byte_size: int) -> None:
        self.name, self.byte_size = name, byte_size


class _Opened:
    noun = "CUDA shared-memory"

    def __init__(self, status: _Status) -> None:
        self.status = status

    def release(self) -> None:
        pass


def test_one_name_registered_as_both_kinds_at_once_succeeds_once(regions: Any) -> None:
    """The attack: register one name as a system region and as a CUDA region at the
    same moment. Each kind used to check the other under a different lock, and both
    registrations succeeded; the name and the limits are now checked and taken
    under one lock, across both kinds."""
    key = regions(64)[1]
    names = _SlowTable(True, 64, 1 << 20, 1 << 20)
    system, cuda = SharedMemory(names, Copies()), _SimulatedCuda(names)
    rounds = 8
    for round_ in range(rounds):
        name = f"dual-{round_}"
        start = threading.Barrier(2)
        outcomes: dict[str, BaseException | None] = {}

        def register(
            kind: str,
            name: str = name,
            start: threading.Barrier = start,
            outcomes: dict[str, BaseException | None] = outcomes,
        ) -> None:
            start.wait()
            try:
                if kind == "system":
                    system.register("mallory", name, f"/{key}", 0, 64)
                else:
                    cuda.register("mallory", name, 64)
                outcomes[kind] = None
            except Exception as exc:  # the outcome under test
                outcomes[kind] = exc

        threads = [threading.Thread(target=register, args=(k,)) for k in ("system", "cuda")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        won = [kind for kind, outcome in outcomes.items() if outcome is None]
        lost = [outcome for outcome in outcomes.values() if outcome is not None]
        assert len(won) == 1, (round_, outcomes)
        assert isinstance(lost[0], RegionExistsError), lost
        assert "registered already, as a" in str(lost[0])
    assert names.held("mallory") == (rounds, 64 * rounds)
    assert system.count() + names.count(_Opened) == rounds
    names.close()
    assert names.held("mallory") == (0, 0) and names.bytes == 0
    assert fds_on(key) == 0


# ---------------------------------------------------------------- status codes


@pytest.mark.parametrize("allowed", [True, False], ids=["shared-memory-on", "shared-memory-off"])
def test_cuda_shared_memory_on_a_cpu_server_is_never_unavailable(
    engine: Any, allowed: bool
) -> None:
    """UNAVAILABLE means "retry", and clients do: CUDA shared memory on a server that
    has no CUDA device is UNIMPLEMENTED (it never will be), and FAILED_PRECONDITION
    while shared memory is off (as the docs say: the operator can turn it on)."""
    want = "StatusCode.UNIMPLEMENTED" if allowed else "StatusCode.FAILED_PRECONDITION"
    words = "no CUDA device" if allowed else "--allow-shared-memory"
    with (
        serving(engine, allow_shared_memory=allowed) as address,
        triton.InferenceServerClient(address) as c,
    ):
        calls = {
            "register": lambda: c.register_cuda_shared_memory("gpu", b"\1" * 64, 0, 1024),
            "status": lambda: c.get_cuda_shared_memory_status(),
            "unregister": lambda: c.unregister_cuda_shared_memory(),
        }
        for what, make in calls.items():
            with pytest.raises(InferenceServerException) as refused:
                make()
            assert status(refused) == want, (what, refused.value.message())
            assert words in refused.value.message()
        metadata = c.get_server_metadata()
        assert "cuda_shared_memory" not in metadata.extensions


# ---------------------------------------------------------------- a train-only token


def test_a_train_only_token_trains_but_cannot_put_or_get(engine: Any) -> None:
    """A token with the train scope alone opens a session for its trainer, steps,
    reads its parameters, frees the trainer and closes the session; storing or
    fetching arbitrary tensors still needs the tensors scope."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16))
    y = np.sin(x @ rng.standard_normal((16, 4)))
    with serving(engine, tokens=TOKENS) as address:
        with Client(address, token=TRAINER, timeout=60) as c:
            with c.trainer("mlp64", optimizer="sgd", lr=0.1, loss="mse") as trainer:
                losses = [trainer.step(x, y) for _ in range(5)]
                assert losses[-1] < losses[0]
                assert set(trainer.parameters())
            assert not c.session_info().trainers  # freed by the with block
            with pytest.raises(PermissionDeniedError, match="'tensors' scope"):
                c.put(np.ones(4))
            c.close()
        with _raw(address, INFERRER) as inferrer:
            with pytest.raises(grpc.RpcError) as denied:
                Raw(address, INFERRER).open()
            assert code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
            assert "'tensors or train' scope" in _details(denied.value)
            assert not inferrer


def test_racing_sessions_of_one_token_cannot_pass_its_share_together() -> None:
    """The attack: keep a tensor in each of eight sessions of one token at the same
    moment, each within its quota, so that every check sees the others' bytes not yet
    taken. The token's bytes are checked and taken in one step: its share holds."""
    block = torch.zeros(1 << 17, dtype=torch.float64)  # 1 MiB
    share = 3 * storage_bytes(block)
    sessions = Sessions(
        2 * share, 60.0, 64, sessions_per_identity=8, ledger=Ledger(share, 64 * share)
    )
    try:
        opened = [sessions.open("mallory") for _ in range(8)]
        start = threading.Barrier(len(opened))
        kept: list[bool] = []

        def keep(session: Session) -> None:
            start.wait()
            try:
                session.keep(block.clone())
                kept.append(True)
            except ResourceExhaustedError:
                kept.append(False)

        threads = [threading.Thread(target=keep, args=(s,)) for s in opened]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(kept) == [False] * 5 + [True] * 3
        assert sessions.ledger.held("mallory") == share == sessions.bytes()
        assert sessions.open("alice").keep(block).shape == (1 << 17,)  # another token
    finally:
        sessions.stop()
    assert sessions.ledger.total == 0


def test_without_tokens_every_caller_is_one_identity_bounded_by_the_server(
    engine: Any,
) -> None:
    """Without tokens the server cannot tell callers apart: the per-token shares do
    not split one anonymous identity; the server's caps bound everyone together."""
    limits = {"max_sessions": 6, "max_sessions_per_token": 2}
    with serving(engine, **limits) as address, _raw(address, "") as anyone:
        refused = _open_until_refused(address, "", anyone, 10)
        assert len(anyone) == 6
        assert "the server holds its maximum of 6 sessions" in _details(refused)
