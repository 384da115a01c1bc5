"""Streamed calls over raw gRPC (InferStream parts by hand), and waiting on a server process."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from tensorwire._transport.methods import method_path
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.protocol import CHANNEL_OPTIONS


def chunk_part(data: bytes) -> bytes:
    return pb.InferRequestPart(chunk=data).SerializeToString()


def send_parts(address: str, parts: Iterator[bytes] | list[bytes]) -> list[bytes]:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(method_path("InferStream"))
        return list(call(iter(parts), timeout=30))


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def wait_for(condition: Any, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def header_part(nbytes: int) -> bytes:
    return pb.InferRequestPart(
        header=pb.InferRequest(
            model="identity",
            inputs=[pb.NamedTensor(tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[nbytes]))],
        )
    ).SerializeToString()
