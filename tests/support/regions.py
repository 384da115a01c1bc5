"""Shared-memory tests' servers, tritonclient-made regions, and what a process maps."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from conftest import on_device
from tritonclient.utils import InferenceServerException

from support.kserve import ARRAYS
from tensorwire_server.engine.engine import Engine
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_engine(on_device(Settings(device="cpu")))


@contextmanager
def serving(engine: Engine, **settings: Any) -> Iterator[str]:
    server = TensorwireServer(Settings(port=0, device="cpu", **settings), engine)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)


@pytest.fixture
def regions() -> Iterator[Callable[[int], tuple[shm.SharedMemoryRegion, str]]]:
    """Makes shared-memory objects as tritonclient users do, each with a fresh key
    (which is also its region's name); destroys those still there after the test."""
    made: list[shm.SharedMemoryRegion] = []

    def make(size: int) -> tuple[shm.SharedMemoryRegion, str]:
        key = f"/tw-test-{secrets.token_hex(6)}"
        made.append(shm.create_shared_memory_region(key[1:], key, size, create_only=True))
        _CLIENT_FDS[key[1:]] = _fds_on(key[1:])
        return made[-1], key[1:]

    yield make
    for handle in made:
        with contextlib.suppress(FileNotFoundError):  # a test unlinked it already
            shm.destroy_shared_memory_region(handle)


def status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def shared_input(name: str, arr: np.ndarray, region: str, offset: int = 0) -> triton.InferInput:
    tensor = triton.InferInput(name, list(arr.shape), _datatype(arr))
    return tensor.set_shared_memory(region, arr.nbytes, offset)


def shared_output(name: str, region: str, byte_size: int, offset: int = 0) -> Any:
    output = triton.InferRequestedOutput(name)
    output.set_shared_memory(region, byte_size, offset)
    return output


def read_output(handle: shm.SharedMemoryRegion, result: Any, name: str, offset: int = 0) -> Any:
    """An output written to shared memory, as Triton's own examples read it: its
    datatype and shape from the response, its bytes from the region."""
    output = result.get_output(name)
    dtype = ml_dtypes.bfloat16 if output.datatype == "BF16" else _np_dtype(output.datatype)
    return shm.get_contents_as_numpy(handle, dtype, list(output.shape), offset)


def fds_on(key: str) -> int:
    """The server's open descriptors on /dev/shm's ``key``: this process's (the server
    runs here), less those the client side holds."""
    return _fds_on(key) - _CLIENT_FDS.get(key, 0)


def _datatype(arr: np.ndarray) -> str:
    return next(k for k, v in ARRAYS.items() if v.dtype == arr.dtype)


def _np_dtype(datatype: str) -> Any:
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(datatype)


#: The descriptors tritonclient's helpers hold on each object the tests made.
_CLIENT_FDS: dict[str, int] = {}


def _fds_on(key: str) -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        found += target.startswith(f"/dev/shm/{key}")
    return found


ALICE = secrets.token_urlsafe(24)


BOB = secrets.token_urlsafe(24)


PEEK = secrets.token_urlsafe(24)  # a token without the infer scope
