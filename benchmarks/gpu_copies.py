"""benchmarks/run.py's GPU rows: host-to-device through the server's own request paths
(unary, and streamed with a device stager) and device-to-host through its response
path, each against torch's own pinned-memory copy. Empty without CUDA.

Every row's result is checked byte for byte against its payload after it is timed
(a copy that raced its stream would be fast and wrong). Run alone, it prints the rows
as JSON (scripts/gpu-check): ``python benchmarks/gpu_copies.py --sizes 1M,64M``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from measuring import best_of, make_payload, parse_size
from table import GPU_D2H, GPU_D2H_FLOOR, GPU_H2D, GPU_H2D_FLOOR, GPU_H2D_STREAM, Rows


def measure_gpu(sizes: list[int], repeats: int) -> Rows:
    """Host-to-device through the server's own request path against a plain pinned
    copy, and device-to-host likewise; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    from tensorwire_server.device.tensors import to_device, to_numpy

    device = torch.device("cuda:0")
    names = (GPU_H2D, GPU_H2D_STREAM, GPU_H2D_FLOOR, GPU_D2H, GPU_D2H_FLOOR)
    rows: Rows = {name: {} for name in names}
    for size in sizes:
        host = make_payload(size)
        pinned = torch.from_numpy(host).pin_memory()
        on_device = pinned.to(device)

        def synced(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                fn()
                torch.cuda.synchronize(device)

            return run

        h2d = partial(to_device, host, device)
        h2d_floor = partial(pinned.to, device, non_blocking=True)
        d2h = partial(to_numpy, on_device, "x")
        d2h_floor = partial(pinned.copy_, on_device, non_blocking=True)
        rows[GPU_H2D][size] = size / best_of(repeats, synced(h2d))
        verify(GPU_H2D, h2d(), host)
        chunks = request_parts(host)
        rows[GPU_H2D_STREAM][size] = size / best_of(repeats, partial(staged_upload, chunks))
        verify(GPU_H2D_STREAM, staged_upload(chunks), host)
        del chunks
        rows[GPU_H2D_FLOOR][size] = size / best_of(repeats, synced(h2d_floor))
        rows[GPU_D2H][size] = size / best_of(repeats, d2h)
        verify(GPU_D2H, d2h(), host)
        rows[GPU_D2H_FLOOR][size] = size / best_of(repeats, synced(d2h_floor))
        del pinned, on_device
    return rows


def verify(row: str, got: Any, sent: np.ndarray) -> None:
    """Every byte of a row's result against its payload: RuntimeError if one differs."""
    import torch

    if isinstance(got, torch.Tensor):
        got = got.cpu().numpy()
    got = np.asarray(got)
    if got.nbytes != sent.nbytes or not np.array_equal(
        got.reshape(-1).view(np.uint8), sent.reshape(-1).view(np.uint8)
    ):
        differ = np.flatnonzero(got.reshape(-1).view(np.uint8) != sent.reshape(-1).view(np.uint8))
        where = f"first at byte {differ[0]}, {differ.size} in all" if differ.size else "sizes"
        raise RuntimeError(f"{row}: the result differs from the payload ({where})")


def request_parts(host: np.ndarray) -> list[bytes]:
    """The parts of a streamed identity request carrying ``host``, as they arrive."""
    from tensorwire.v1 import tensorwire_pb2 as pb
    from tensorwire.wire.codec import Encoder
    from tensorwire.wire.streaming import parts

    encoder = Encoder(pb.InferRequest(model="identity"))
    encoder.named(encoder.message.inputs.add(), "x", host)
    return list(parts(encoder))


def staged_upload(chunks: list[bytes]) -> Any:
    """Feed a received stream to the server's receiver with a device stager, until its
    tensor is usable on the GPU: the request path's host-to-device share."""
    import torch

    from tensorwire.v1 import tensorwire_pb2 as pb
    from tensorwire.wire.streaming import StreamReceiver
    from tensorwire_server.device.staging import CudaStager
    from tensorwire_server.device.tensors import to_device
    from tensorwire_server.limits import Limits
    from tensorwire_server.settings import Settings

    device = torch.device("cuda:0")
    stager = CudaStager(device, Limits.from_settings(Settings()))
    receiver = StreamReceiver(pb.InferRequest, stager.allocate, landed=stager.landed)
    for raw in chunks:
        receiver.feed(raw)
    request = receiver.finish()
    with stager.using():
        tensor = to_device(request.array(request.message.inputs[0].tensor, "x"), device)
        torch.cuda.synchronize(device)
    stager.close()
    return tensor


def main(argv: list[str] | None = None) -> int:
    """The GPU rows alone, byte-verified, as JSON on stdout (bytes per second)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,64M,256M", help="payload sizes, e.g. 1M,64M")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = measure_gpu(sizes, args.repeats)
    print(json.dumps({"verified": bool(rows), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
