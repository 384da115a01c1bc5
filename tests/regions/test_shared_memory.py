"""Triton's system shared-memory extension on the KServe v2 service, spoken by NVIDIA's
own tritonclient and its shared-memory helpers over real gRPC: registering, inferring
through regions with every datatype, status, unregistering, the flag that turns it
on, each error a client can cause, and regions that belong to their token."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from support import regions as shared_memory
from support.kserve import ARRAYS, X, infer_input, same
from support.regions import fds_on, read_output, serving, shared_input, shared_output, status
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.utils import InferenceServerException

from tensorwire_server.engine.engine import Engine
from tensorwire_server.kserve.v2 import grpc_service_pb2 as ours
from tensorwire_server.server import build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(60)

# The fixtures these tests take, shared with the other shared-memory tests.
engine = shared_memory.engine
regions = shared_memory.regions


@pytest.fixture(scope="module")
def allowed(engine: Engine) -> Iterator[str]:
    """A server with shared memory on and no tokens."""
    with serving(engine, allow_shared_memory=True) as address:
        yield address


@pytest.fixture(scope="module")
def client(allowed: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(allowed) as c:
        yield c


# ---------------------------------------------------------------- the wire


def test_the_messages_are_tritons_field_for_field() -> None:
    def fields(message: Any) -> dict[str, tuple[Any, ...]]:
        return {
            f.name: (f.number, f.type, f.is_repeated, getattr(f.message_type, "full_name", None))
            for f in message.fields
        }

    names = [n for n in ours.DESCRIPTOR.message_types_by_name if "SharedMemory" in n]
    assert len(names) == 12
    for name in names:
        mine, theirs = (
            ours.DESCRIPTOR.message_types_by_name[name],
            tpb.DESCRIPTOR.message_types_by_name[name],
        )
        assert fields(mine) == fields(theirs), name
        for nested in mine.nested_types:
            assert fields(nested) == fields(theirs.nested_types_by_name[nested.name]), name
    service = tpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        twin = service.methods_by_name[method.name]
        assert method.input_type.full_name == twin.input_type.full_name
        assert method.output_type.full_name == twin.output_type.full_name


# ---------------------------------------------------------------- inference through regions


@pytest.mark.parametrize("datatype", ARRAYS)
def test_identity_through_shared_memory_every_datatype(
    client: triton.InferenceServerClient, regions: Any, datatype: str
) -> None:
    arr = ARRAYS[datatype]
    (inp, inp_name), (out, out_name) = regions(arr.nbytes + 8), regions(arr.nbytes + 16)
    shm.set_shared_memory_region(inp, [arr], offset=8)
    client.register_system_shared_memory(inp_name, f"/{inp_name}", arr.nbytes + 8)
    client.register_system_shared_memory(out_name, f"/{out_name}", arr.nbytes + 16)
    result = client.infer(
        "identity",
        [shared_input("input", arr, inp_name, offset=8)],
        outputs=[shared_output("output", out_name, arr.nbytes + 8, offset=8)],
    )
    output = result.get_output("output")
    assert (output.datatype, list(output.shape)) == (datatype, list(arr.shape))
    assert same(read_output(out, result, "output", offset=8), arr)
    # As Triton: an empty raw entry for the output, which the caller reads from its region.
    assert result.get_response().raw_output_contents == [b""]
    client.unregister_system_shared_memory()


@pytest.mark.parametrize(("model", "dtype"), [("mlp", np.float32), ("mlp64", np.float64)])
def test_mlp_through_shared_memory_matches_the_network_path(
    client: triton.InferenceServerClient, regions: Any, model: str, dtype: Any
) -> None:
    x = X.astype(dtype)
    expected = client.infer(model, [infer_input("input", x)]).as_numpy("output")
    (inp, inp_name), (out, out_name) = regions(x.nbytes), regions(4096)
    shm.set_shared_memory_region(inp, [x])
    client.register_system_shared_memory(inp_name, f"/{inp_name}", x.nbytes)
    client.register_system_shared_memory(out_name, f"/{out_name}", 2048, offset=1024)
    for _ in range(2):  # the same regions serve request after request
        result = client.infer(
            model,
            [shared_input("input", x, inp_name)],
            outputs=[shared_output("output", out_name, 2048)],
        )
        got = shm.get_contents_as_numpy(out, dtype, [8, 4], offset=1024)
        assert same(got, expected)
        assert result.get_output("output").shape == [8, 4]
    client.unregister_system_shared_memory()


def test_shared_and_sent_tensors_mix_in_one_request(
    client: triton.InferenceServerClient, regions: Any
) -> None:
    a, b = ARRAYS["INT16"], ARRAYS["FP64"]
    (inp, inp_name), (out, out_name) = regions(64), regions(64)
    shm.set_shared_memory_region(inp, [a])
    client.register_system_shared_memory(inp_name, f"/{inp_name}", 64)
    client.register_system_shared_memory(out_name, f"/{out_name}", 64)
    outputs = [shared_output("a", out_name, 64), triton.InferRequestedOutput("b")]
    result = client.infer(
        "echo", [shared_input("a", a, inp_name), infer_input("b", b)], outputs=outputs
    )
    assert same(result.as_numpy("b"), b)  # its raw entry keeps its index
    assert same(read_output(out, result, "a"), a)
    stream: list[Any] = []
    client.start_stream(callback=lambda result, error: stream.append(error or result))
    try:
        client.async_stream_infer("echo", [shared_input("a", a, inp_name)], outputs=outputs[:1])
    finally:
        client.stop_stream()
    assert same(read_output(out, stream[0], "a"), a)
    client.unregister_system_shared_memory()


# ---------------------------------------------------------------- status and unregister


def test_status_lists_the_regions_and_unregister_forgets_them(
    client: triton.InferenceServerClient, regions: Any
) -> None:
    names = [regions(256)[1] for _ in range(3)]
    for i, name in enumerate(names):
        client.register_system_shared_memory(name, f"/{name}", 128, offset=i * 64)
        assert fds_on(name) == 1
    listed = client.get_system_shared_memory_status().regions
    assert sorted(listed) == sorted(names)
    one = client.get_system_shared_memory_status(names[2]).regions[names[2]]
    assert (one.name, one.key, one.offset, one.byte_size) == (names[2], f"/{names[2]}", 128, 128)
    client.unregister_system_shared_memory(names[0])
    assert fds_on(names[0]) == 0
    client.unregister_system_shared_memory("never-registered")  # no error, as in Triton
    assert sorted(client.get_system_shared_memory_status().regions) == sorted(names[1:])
    with pytest.raises(InferenceServerException) as missing:
        client.get_system_shared_memory_status(names[0])
    assert status(missing) == "StatusCode.NOT_FOUND"
    client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions
    assert fds_on(names[1]) == fds_on(names[2]) == 0


def test_a_stopping_server_closes_its_regions(engine: Engine, regions: Any) -> None:
    _, name = regions(64)
    with serving(engine, allow_shared_memory=True) as address:
        with triton.InferenceServerClient(address) as c:
            c.register_system_shared_memory(name, f"/{name}", 64)
            assert "system_shared_memory" in c.get_server_metadata().extensions
        assert fds_on(name) == 1
    assert fds_on(name) == 0


# ---------------------------------------------------------------- off by default


def test_without_the_flag_every_shared_memory_call_is_refused(engine: Engine, regions: Any) -> None:
    handle, name = regions(X.nbytes)
    shm.set_shared_memory_region(handle, [X])
    with serving(engine) as address, triton.InferenceServerClient(address) as c:
        assert "system_shared_memory" not in c.get_server_metadata().extensions
        calls: list[Callable[[], object]] = [
            lambda: c.register_system_shared_memory(name, f"/{name}", X.nbytes),
            lambda: c.get_system_shared_memory_status(),
            lambda: c.unregister_system_shared_memory(),
            lambda: c.infer("mlp", [shared_input("input", X, name)]),
        ]
        for refused in calls:
            with pytest.raises(InferenceServerException) as exc:
                refused()
            assert status(exc) == "StatusCode.FAILED_PRECONDITION"
            assert "--allow-shared-memory" in exc.value.message()
        assert fds_on(name) == 0
        assert c.infer("mlp", [infer_input("input", X)]).as_numpy("output").shape == (8, 4)


def test_cuda_shared_memory_is_unimplemented_without_a_cuda_device(
    client: triton.InferenceServerClient,
) -> None:
    # Not UNAVAILABLE, which clients retry: this server never offers it.
    for call in (
        lambda: client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 1024),
        lambda: client.get_cuda_shared_memory_status(),
        lambda: client.unregister_cuda_shared_memory(),
    ):
        with pytest.raises(InferenceServerException) as exc:
            call()
        assert status(exc) == "StatusCode.UNIMPLEMENTED"
        assert "this server has no CUDA device" in exc.value.message()


# ---------------------------------------------------------------- registration errors


def test_bad_registrations_get_a_clear_status(
    client: triton.InferenceServerClient, regions: Any
) -> None:
    _, name = regions(128)
    link, folder, fifo = (f"/dev/shm/tw-test-{secrets.token_hex(6)}" for _ in range(3))
    os.symlink(f"/dev/shm/{name}", link)
    os.mkdir(folder)
    os.mkfifo(fifo)
    try:
        cases = [
            ("r", name, 0, 64, "INVALID_ARGUMENT", "is not a POSIX shared-memory name"),
            ("r", "/a/b", 0, 64, "INVALID_ARGUMENT", "is not a POSIX shared-memory name"),
            ("r", "/..", 0, 64, "INVALID_ARGUMENT", "is not a POSIX shared-memory name"),
            ("r", "/../etc/passwd", 0, 64, "INVALID_ARGUMENT", "no further '/'"),
            ("r", "/" + "x" * 256, 0, 64, "INVALID_ARGUMENT", "1 to 255 bytes"),
            ("r", link[8:], 0, 64, "INVALID_ARGUMENT", "is a symbolic link"),
            ("r", folder[8:], 0, 64, "INVALID_ARGUMENT", "is not a shared-memory object"),
            ("r", fifo[8:], 0, 64, "INVALID_ARGUMENT", "is not a shared-memory object"),
            ("r", "/tw-test-missing", 0, 64, "NOT_FOUND", "no shared-memory object"),
            ("r", f"/{name}", 0, 129, "INVALID_ARGUMENT", "which holds 128 bytes"),
            ("r", f"/{name}", 200, 1, "INVALID_ARGUMENT", "offset 200 + byte_size 1 runs past"),
            ("r", f"/{name}", 0, 0, "INVALID_ARGUMENT", "byte_size must be positive"),
            ("", f"/{name}", 0, 64, "INVALID_ARGUMENT", "region name ''"),
        ]
        for region, key, offset, size, code, message in cases:
            with pytest.raises(InferenceServerException) as exc:
                client.register_system_shared_memory(region, key, size, offset)
            assert status(exc) == f"StatusCode.{code}", (key, exc.value.message())
            assert message in exc.value.message(), key
        client.register_system_shared_memory("r", f"/{name}", 128)
        with pytest.raises(InferenceServerException) as again:
            client.register_system_shared_memory("r", f"/{name}", 64)
        assert status(again) == "StatusCode.ALREADY_EXISTS"
        assert fds_on(name) == 1  # the refusals left nothing open
    finally:
        client.unregister_system_shared_memory()
        os.unlink(link)
        os.rmdir(folder)
        os.unlink(fifo)


def test_registrations_past_the_limits_are_refused(engine: Engine, regions: Any) -> None:
    names = [regions(1024)[1] for _ in range(3)]
    limits = {"max_shared_memory_regions": 2, "max_shared_memory_bytes": 1536}
    with (
        serving(engine, allow_shared_memory=True, **limits) as address,
        triton.InferenceServerClient(address) as c,
    ):
        c.register_system_shared_memory(names[0], f"/{names[0]}", 1024)
        with pytest.raises(InferenceServerException) as too_big:
            c.register_system_shared_memory(names[1], f"/{names[1]}", 1024)
        assert "max_shared_memory_bytes (1536)" in too_big.value.message()
        c.register_system_shared_memory(names[1], f"/{names[1]}", 512)
        with pytest.raises(InferenceServerException) as too_many:
            c.register_system_shared_memory(names[2], f"/{names[2]}", 1)
        assert status(too_many) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "max_shared_memory_regions" in too_many.value.message()
        assert fds_on(names[2]) == 0


# ---------------------------------------------------------------- inference errors


def test_bad_placements_get_a_clear_status_and_the_server_goes_on(
    client: triton.InferenceServerClient, regions: Any
) -> None:
    (inp, inp_name), (_, out_name) = regions(X.nbytes), regions(64)
    shm.set_shared_memory_region(inp, [X])
    client.register_system_shared_memory(inp_name, f"/{inp_name}", X.nbytes)
    client.register_system_shared_memory(out_name, f"/{out_name}", 64)

    def placed(**parameters: Any) -> triton.InferInput:
        tensor = triton.InferInput("input", [8, 16], "FP32")
        for key, value in parameters.items():
            setattr(tensor._get_tensor().parameters[key], *value)
        return tensor

    good = [shared_input("input", X, inp_name)]
    cases: list[tuple[list[Any], list[Any], str, str]] = [
        (
            [shared_input("input", X, "nowhere")],
            [],
            "NOT_FOUND",
            "no shared-memory region 'nowhere'",
        ),
        (
            [triton.InferInput("input", [8, 16], "FP32").set_shared_memory(inp_name, 511)],
            [],
            "INVALID_ARGUMENT",
            "shared_memory_byte_size is 511 but FP32 [8, 16] is 512 bytes",
        ),
        (
            [shared_input("input", X, inp_name, offset=4)],
            [],
            "INVALID_ARGUMENT",
            "runs past the end",
        ),
        (
            [triton.InferInput("input", [8, 16], "FP64").set_shared_memory(inp_name, 512)],
            [],
            "INVALID_ARGUMENT",
            "FP64 [8, 16] is 1024 bytes",
        ),
        (good, [shared_output("output", out_name, 65)], "INVALID_ARGUMENT", "runs past the end"),
        (good, [shared_output("output", out_name, 64)], "INVALID_ARGUMENT", "is 128 bytes, more"),
        (good, [shared_output("output", "nowhere", 8)], "NOT_FOUND", "requested output 'output'"),
        (
            [placed(shared_memory_byte_size=("int64_param", 512))],
            [],
            "INVALID_ARGUMENT",
            "shared_memory_byte_size is given without shared_memory_region",
        ),
        (
            [placed(shared_memory_region=("int64_param", 1))],
            [],
            "INVALID_ARGUMENT",
            "shared_memory_region must be a string_param",
        ),
    ]
    for inputs, outputs, code, message in cases:
        with pytest.raises(InferenceServerException) as exc:
            client.infer("mlp", inputs, outputs=outputs or None)
        assert status(exc) == f"StatusCode.{code}", exc.value.message()
        assert message in exc.value.message()
        assert client.infer("mlp", good).as_numpy("output").shape == (8, 4)  # serves on
    client.unregister_system_shared_memory()


def test_a_region_its_client_unlinked_keeps_working(
    client: triton.InferenceServerClient, regions: Any
) -> None:
    (inp, inp_name), (out, out_name) = regions(X.nbytes), regions(X.nbytes)
    shm.set_shared_memory_region(inp, [X])
    client.register_system_shared_memory(inp_name, f"/{inp_name}", X.nbytes)
    client.register_system_shared_memory(out_name, f"/{out_name}", X.nbytes)
    for name in (inp_name, out_name):
        os.unlink(f"/dev/shm/{name}")
    result = client.infer(
        "identity",
        [shared_input("input", X, inp_name)],
        outputs=[shared_output("output", out_name, X.nbytes)],
    )
    # Both sides still hold the memory: the server its descriptor, the client its mapping.
    assert same(read_output(out, result, "output"), X)
    client.unregister_system_shared_memory()
    with pytest.raises(InferenceServerException) as gone:
        client.register_system_shared_memory(inp_name, f"/{inp_name}", X.nbytes)
    assert status(gone) == "StatusCode.NOT_FOUND"


def test_a_shrunk_region_is_refused_without_harm(client: triton.InferenceServerClient) -> None:
    # No mapping on either side here: a shrunk object would fault this test's own reads.
    names = [f"tw-test-{secrets.token_hex(6)}" for _ in range(2)]
    fds = [os.open(f"/dev/shm/{n}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600) for n in names]
    try:
        for fd, name in zip(fds, names, strict=True):
            os.ftruncate(fd, 4096)
            os.pwrite(fd, X.tobytes(), 0)
            client.register_system_shared_memory(name, f"/{name}", 4096)
        os.ftruncate(fds[0], 100)
        with pytest.raises(InferenceServerException) as read:
            client.infer("mlp", [shared_input("input", X, names[0])])
        assert status(read) == "StatusCode.FAILED_PRECONDITION"
        assert f"region '{names[0]}' was shrunk to 100 bytes" in read.value.message()
        os.ftruncate(fds[1], 64)
        with pytest.raises(InferenceServerException) as write:
            client.infer(
                "identity",
                [infer_input("input", X)],
                outputs=[shared_output("output", names[1], 4096)],
            )
        assert "was shrunk to 64 bytes" in write.value.message()
        assert os.fstat(fds[1]).st_size == 64  # not grown back by the server
        os.ftruncate(fds[0], 4096)
        os.pwrite(fds[0], X.tobytes(), 0)
        result = client.infer("identity", [shared_input("input", X, names[0])])
        assert same(result.as_numpy("output"), X)
    finally:
        client.unregister_system_shared_memory()
        for fd, name in zip(fds, names, strict=True):
            os.close(fd)
            os.unlink(f"/dev/shm/{name}")


def test_the_flag_and_limits_are_settings_like_any_other() -> None:
    env = {
        "TENSORWIRE_ALLOW_SHARED_MEMORY": "yes",
        "TENSORWIRE_MAX_SHARED_MEMORY_REGIONS": "3",
        "TENSORWIRE_MAX_SHARED_MEMORY_BYTES": "4096",
    }
    settings = Settings.from_env(env)
    assert (settings.allow_shared_memory, settings.max_shared_memory_regions) == (True, 3)
    assert settings.max_shared_memory_bytes == 4096 and not Settings().allow_shared_memory
    with pytest.raises(ValueError, match="max_shared_memory_regions must be positive"):
        Settings(max_shared_memory_regions=0)


@pytest.mark.cuda
def test_on_a_cuda_server_system_regions_feed_the_gpu(
    regions: Any,
) -> None:
    (inp, inp_name), (out, out_name) = regions(X.nbytes), regions(X.nbytes)
    shm.set_shared_memory_region(inp, [X])
    with (
        serving(build_engine(Settings(device="cuda")), allow_shared_memory=True) as address,
        triton.InferenceServerClient(address) as c,
    ):
        expected = c.infer("mlp", [infer_input("input", X)]).as_numpy("output")
        c.register_system_shared_memory(inp_name, f"/{inp_name}", X.nbytes)
        c.register_system_shared_memory(out_name, f"/{out_name}", X.nbytes)
        outputs = [shared_output("output", out_name, X.nbytes)]
        result = c.infer("mlp", [shared_input("input", X, inp_name)], outputs=outputs)
        np.testing.assert_allclose(read_output(out, result, "output"), expected, rtol=1e-5)
