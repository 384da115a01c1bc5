"""benchmarks/run.py's GPU rows: host-to-device through the server's own request paths
(unary, and streamed with a device stager) and device-to-host through its response
path, each against torch's own pinned-memory copy. Empty without CUDA."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from measuring import best_of, make_payload
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
        chunks = request_parts(host)
        rows[GPU_H2D_STREAM][size] = size / best_of(repeats, partial(staged_upload, chunks))
        del chunks
        rows[GPU_H2D_FLOOR][size] = size / best_of(repeats, synced(h2d_floor))
        rows[GPU_D2H][size] = size / best_of(repeats, d2h)
        rows[GPU_D2H_FLOOR][size] = size / best_of(repeats, synced(d2h_floor))
        del pinned, on_device
    return rows


def request_parts(host: np.ndarray) -> list[bytes]:
    """The parts of a streamed identity request carrying ``host``, as they arrive."""
    from tensorwire.v1 import tensorwire_pb2 as pb
    from tensorwire.wire.codec import Encoder
    from tensorwire.wire.streaming import parts

    encoder = Encoder(pb.InferRequest(model="identity"))
    encoder.named(encoder.message.inputs.add(), "x", host)
    return list(parts(encoder))


def staged_upload(chunks: list[bytes]) -> None:
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
        to_device(request.array(request.message.inputs[0].tensor, "x"), device)
        torch.cuda.synchronize(device)
    stager.close()
