"""The floors and the peer the benchmark measures tensorwire against, each run as its own
process on loopback: raw TCP, a bare grpcio unary echo, torch.distributed.rpc."""

from __future__ import annotations

import os
import socket
import sys
import time
from concurrent import futures
from multiprocessing.connection import Connection

import grpc

ECHO_METHOD = "/bench.Echo/Echo"
CHUNK = 1 << 20


def tcp_sink(port_out: Connection) -> None:
    """Accept one connection; for each 8-byte length, read that many bytes, answer 1 byte."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_out.send(server.getsockname()[1])
        conn, _ = server.accept()
        buf = bytearray(CHUNK * 16)
        view = memoryview(buf)
        with conn:
            while header := conn.recv(8, socket.MSG_WAITALL):
                remaining = int.from_bytes(header, "little")
                while remaining:
                    remaining -= conn.recv_into(view, min(remaining, len(buf)))
                conn.sendall(b"k")


def tcp_send_seconds(sock: socket.socket, payload: memoryview, repeats: int) -> float:
    """Best time to push ``payload`` one way over loopback TCP (acknowledged)."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        sock.sendall(len(payload).to_bytes(8, "little"))
        sock.sendall(payload)
        sock.recv(1)
        best = min(best, time.perf_counter() - start)
    return best


def grpc_echo_server(port_out: Connection) -> None:
    """A bare grpcio server whose one unary method returns its request bytes."""
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    port_out.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def grpc_aio_echo_server(port_out: Connection, host: str = "127.0.0.1") -> None:
    """The same echo on grpc.aio: one event loop, no thread hand-offs."""
    import asyncio

    async def echo(request: bytes, context: object) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
            ]
        )
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
        )
        port_out.send(server.add_insecure_port(f"{host}:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _identity(tensor: object) -> object:
    return tensor


def rpc_latency_worker(
    rank: int, port: int, calls: int, out: Connection, tcp: bool = True, master: str = "127.0.0.1"
) -> None:
    """torch.distributed.rpc forced onto TCP (TensorPipe's uv transport, basic channel,
    as between two hosts; ``tcp=False``: its defaults, shared memory on one host): rank
    0 times ``calls`` sequential round trips of a [1, 16] float32 tensor to an identity
    on rank 1; sends the times in seconds. ``master``: rank 0's address."""
    import torch
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port))
    forced: dict[str, object] = {"_transports": ["uv"], "_channels": ["basic"]} if tcp else {}
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, rpc_timeout=600, **forced)
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        tensor = torch.ones((1, 16), dtype=torch.float32)
        for _ in range(200):  # warm-up
            rpc.rpc_sync("w1", _identity, args=(tensor,))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            rpc.rpc_sync("w1", _identity, args=(tensor,))
            times.append(time.perf_counter() - start)
        out.send(times)
    rpc.shutdown()


def rpc_worker(
    rank: int, port: int, sizes: list[int], repeats: int, tcp: bool, out: Connection
) -> None:
    """torch.distributed.rpc over TensorPipe: rank 0 sends each tensor to rank 1 and
    back. ``tcp``: forced onto TCP (uv transport, basic channel), as between two
    hosts; else its defaults, which on one host use shared memory."""
    import torch
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    forced: dict[str, object] = {"_transports": ["uv"], "_channels": ["basic"]} if tcp else {}
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, rpc_timeout=600, **forced)
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        results = {}
        for size in sizes:
            try:
                tensor = torch.ones(size, dtype=torch.uint8)
                rpc.rpc_sync("w1", _identity, args=(tensor,))
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    back = rpc.rpc_sync("w1", _identity, args=(tensor,))
                    best = min(best, time.perf_counter() - start)
                    del back
                results[size] = best
            except Exception as exc:  # a size TensorPipe cannot move is a gap, not a crash
                print(f"torch.distributed.rpc failed at {size} bytes: {exc}", file=sys.stderr)
            finally:
                tensor = None
        out.send(results)
    rpc.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit("run benchmarks/run.py")
