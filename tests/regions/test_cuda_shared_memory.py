"""On a GPU: Triton's CUDA shared-memory extension, spoken by NVIDIA's tritonclient.
Device memory is made and exported with CUDA IPC by another process
(tests/support/cuda_exporter.py), as a tritonclient user's process would; the server opens
the handles, reads inputs from them and writes outputs into them on the device."""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from support.kserve import ARRAYS, X, infer_input, same
from support.regions import read_output, regions, shared_input, shared_output, status
from tritonclient.utils import InferenceServerException

from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(120)]

__all__ = ["regions"]  # the fixture, shared with the system shared-memory tests


class Exporter:
    """The other process and the device memory it exported."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parents[1] / "support" / "cuda_exporter.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def alloc(self, size: int) -> tuple[int, bytes]:
        """A new allocation: its id here, and its IPC handle as tritonclient passes it."""
        ident, handle = self.ask(f"alloc {size}").split()
        return int(ident), base64.b64encode(bytes.fromhex(handle))

    def write(self, ident: int, data: bytes, offset: int = 0) -> None:
        assert self.ask(f"write {ident} {offset} {data.hex()}") == "ok"

    def read(self, ident: int, size: int, offset: int = 0) -> bytes:
        return bytes.fromhex(self.ask(f"read {ident} {offset} {size}"))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.kill()
        self.process.wait(30)


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    made = Exporter()
    yield made
    made.close()


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    engine = build_engine(Settings(device="cuda"))
    server = TensorwireServer(Settings(port=0, device="cuda", allow_shared_memory=True), engine)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)


@pytest.fixture
def client(address: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(address) as c:
        yield c
        c.unregister_cuda_shared_memory()
        c.unregister_system_shared_memory()


def _name() -> str:
    return f"gpu-{secrets.token_hex(4)}"


@pytest.mark.parametrize("datatype", ARRAYS)
def test_identity_through_cuda_regions_every_datatype(
    client: triton.InferenceServerClient, exporter: Exporter, datatype: str
) -> None:
    arr = ARRAYS[datatype]
    (inp, inp_handle), (out, out_handle) = exporter.alloc(4096), exporter.alloc(4096)
    exporter.write(inp, arr.tobytes(), offset=8)
    inp_name, out_name = _name(), _name()
    client.register_cuda_shared_memory(inp_name, inp_handle, 0, 4096)
    client.register_cuda_shared_memory(out_name, out_handle, 0, 4096)
    result = client.infer(
        "identity",
        [shared_input("input", arr, inp_name, offset=8)],
        outputs=[shared_output("output", out_name, arr.nbytes, offset=16)],
    )
    output = result.get_output("output")
    assert (output.datatype, list(output.shape)) == (datatype, list(arr.shape))
    assert exporter.read(out, arr.nbytes, offset=16) == arr.tobytes()
    assert result.get_response().raw_output_contents == [b""]


def test_mlp_through_cuda_regions_matches_the_network_path(
    client: triton.InferenceServerClient, exporter: Exporter
) -> None:
    expected = client.infer("mlp", [infer_input("input", X)]).as_numpy("output")
    (inp, inp_handle), (out, out_handle) = exporter.alloc(X.nbytes), exporter.alloc(4096)
    exporter.write(inp, X.tobytes())
    inp_name, out_name = _name(), _name()
    client.register_cuda_shared_memory(inp_name, inp_handle, 0, X.nbytes)
    client.register_cuda_shared_memory(out_name, out_handle, 0, 4096)
    for _ in range(2):  # the same regions serve request after request
        client.infer(
            "mlp",
            [shared_input("input", X, inp_name)],
            outputs=[shared_output("output", out_name, 4096)],
        )
        got = np.frombuffer(exporter.read(out, expected.nbytes), np.float32).reshape(8, 4)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cuda_and_system_regions_mix_in_one_request(
    client: triton.InferenceServerClient, exporter: Exporter, regions: Any
) -> None:
    a, b = ARRAYS["INT16"], ARRAYS["FP64"]
    device, handle = exporter.alloc(4096)
    exporter.write(device, a.tobytes())
    (host, host_name), gpu_name = regions(4096), _name()
    shm.set_shared_memory_region(host, [b])
    client.register_cuda_shared_memory(gpu_name, handle, 0, 4096)
    client.register_system_shared_memory(host_name, f"/{host_name}", 4096)
    # a: device to host region; b: host region to device, past a.
    result = client.infer(
        "echo",
        [shared_input("a", a, gpu_name), shared_input("b", b, host_name)],
        outputs=[
            shared_output("a", host_name, 64, offset=1024),
            shared_output("b", gpu_name, 64, offset=1024),
        ],
    )
    assert same(read_output(host, result, "a", offset=1024), a)
    assert exporter.read(device, b.nbytes, offset=1024) == b.tobytes()


def test_status_metadata_and_unregister(
    client: triton.InferenceServerClient, exporter: Exporter
) -> None:
    assert "cuda_shared_memory" in client.get_server_metadata().extensions
    names = sorted(_name() for _ in range(2))
    for name in names:
        client.register_cuda_shared_memory(name, exporter.alloc(1024)[1], 0, 1024)
    regions = client.get_cuda_shared_memory_status(as_json=True)["regions"]
    assert sorted(regions) == names
    assert {int(r["byte_size"]) for r in regions.values()} == {1024}
    client.unregister_cuda_shared_memory(names[0])
    assert sorted(client.get_cuda_shared_memory_status(as_json=True)["regions"]) == names[1:]
    with pytest.raises(InferenceServerException) as gone:
        client.get_cuda_shared_memory_status(names[0])
    assert status(gone) == "StatusCode.NOT_FOUND"


def test_bad_registrations_get_a_clear_status(
    client: triton.InferenceServerClient, exporter: Exporter, regions: Any
) -> None:
    _, handle = exporter.alloc(4096)
    host_name = regions(64)[1]
    client.register_system_shared_memory(host_name, f"/{host_name}", 64)
    cases = [
        (("short", base64.b64encode(b"\1" * 8), 0, 64), "INVALID_ARGUMENT", "raw_handle is 8"),
        (("zeros", base64.b64encode(b"\0" * 64), 0, 64), "INVALID_ARGUMENT", "cannot be opened"),
        (("device", handle, 99, 64), "INVALID_ARGUMENT", "device_id 99"),
        (("big", handle, 0, 64 << 20), "INVALID_ARGUMENT", "runs past the end"),
        ((host_name, handle, 0, 64), "ALREADY_EXISTS", "as a system shared-memory region"),
    ]
    for args, code, words in cases:
        with pytest.raises(InferenceServerException) as refused:
            client.register_cuda_shared_memory(*args)
        assert status(refused) == f"StatusCode.{code}", refused.value.message()
        assert words in refused.value.message()
    client.register_cuda_shared_memory("ok", handle, 0, 4096)
    with pytest.raises(InferenceServerException) as twice:
        client.register_cuda_shared_memory("ok", handle, 0, 4096)
    assert status(twice) == "StatusCode.ALREADY_EXISTS"
    with pytest.raises(InferenceServerException) as past:
        client.infer("identity", [shared_input("input", X, "ok", offset=4090)])
    assert status(past) == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("mlp", [infer_input("input", X)]).as_numpy("output").shape == (8, 4)


def test_an_exporter_that_dies_leaves_the_server_serving(
    client: triton.InferenceServerClient, exporter: Exporter
) -> None:
    _, handle = exporter.alloc(1 << 20)
    client.register_cuda_shared_memory("doomed", handle, 0, 1 << 20)
    exporter.close()  # killed, its allocation registered
    client.unregister_cuda_shared_memory("doomed")
    assert client.infer("mlp", [infer_input("input", X)]).as_numpy("output").shape == (8, 4)


def test_without_the_flag_cuda_regions_are_refused() -> None:
    engine = build_engine(Settings(device="cuda"))
    server = TensorwireServer(Settings(port=0, device="cuda"), engine)
    server.start()
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
            with pytest.raises(InferenceServerException) as off:
                c.register_cuda_shared_memory("gpu", base64.b64encode(b"\1" * 64), 0, 64)
            assert status(off) == "StatusCode.FAILED_PRECONDITION"
            assert "--allow-shared-memory" in off.value.message()
    finally:
        server.stop(None)


def test_a_region_its_exporter_keeps_serves_many_requests(
    client: triton.InferenceServerClient, exporter: Exporter
) -> None:
    payload = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
    ident, handle = exporter.alloc(2 * payload.nbytes)
    exporter.write(ident, payload.tobytes()[:4096])
    client.register_cuda_shared_memory("big", handle, 0, 2 * payload.nbytes)
    sent: Any = [shared_input("input", payload, "big")]
    wanted = [shared_output("output", "big", payload.nbytes, offset=payload.nbytes)]
    for _ in range(20):
        client.infer("identity", sent, outputs=wanted)
    assert exporter.read(ident, 4096, offset=payload.nbytes) == payload.tobytes()[:4096]
