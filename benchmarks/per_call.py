"""The server's CPU per small call, in process: one [1, 16] float32 ``infer`` driven
straight into the fast lane's gate-wrapped handler (``LaneServer.handler``) with a
``LaneContext``, as a lane frame would, without sockets; the CPU time of the server's
loop thread per call (``time.thread_time``), so that other processes on a shared
machine count as little as they can. The same handler, gate and record serve gRPC.

    .venv/bin/python benchmarks/per_call.py [--model identity] [--calls 1000]
        [--rounds 8] [--profile out.prof]

Prints the fastest and the median round (µs per call), the load average, and where
Compute placed the work (its moving averages, µs).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from tensorwire._messages import infer_request
from tensorwire_server.lane.context import LaneContext
from tensorwire_server.server import create_server
from tensorwire_server.settings import Settings

METHOD = "/tensorwire.v1.TensorService/Infer"


async def _one(handler: Any, body: bytes) -> bytes:
    async def request() -> AsyncIterator[bytes]:
        yield body

    context = LaneContext((), 30.0, None)
    result = await handler.stream_unary(request(), context)
    answer: bytes = handler.response_serializer(result)
    context.done()
    code = context.code()
    assert code is None or code.name == "OK", context.status()
    return answer


async def _round(lane: Any, body: bytes, calls: int, profile: cProfile.Profile | None) -> float:
    handler = await lane.handler(METHOD)
    for _ in range(300):  # Compute measures the kind and places it on the loop
        await _one(handler, body)
    if profile is not None:
        profile.enable()
    began = time.thread_time()
    for _ in range(calls):
        await _one(handler, body)
    spent = time.thread_time() - began
    if profile is not None:
        profile.disable()
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="identity")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--profile", help="write the first round's cProfile here")
    args = parser.parse_args()
    server, _ = create_server(Settings(host="127.0.0.1", port=0, device="cpu"))
    server.start()
    try:
        x = np.ones((1, 16), np.float32)
        body = infer_request(args.model, x, None, 0, False).finish()
        lane, loop = server.lane, server._loop
        profile = cProfile.Profile() if args.profile else None
        rounds = sorted(
            asyncio.run_coroutine_threadsafe(
                _round(lane, body, args.calls, profile if i == 0 else None), loop
            ).result()
            for i in range(args.rounds)
        )
        compute = server.compute
        placed = {
            "loop": {str(k): round(v * 1e6, 1) for k, v in compute.loop_costs.items()},
            "thread": {str(k): round(v * 1e6, 1) for k, v in compute.thread_costs.items()},
        }
        print(
            f"{args.model}: server CPU per call {rounds[0]:.1f} us (fastest round), "
            f"{rounds[len(rounds) // 2]:.1f} us (median of {len(rounds)}); "
            f"load {os.getloadavg()[0]:.2f}; Compute's averages {placed}"
        )
        if profile is not None:
            profile.dump_stats(args.profile)
    finally:
        server.stop(None)


if __name__ == "__main__":
    main()
