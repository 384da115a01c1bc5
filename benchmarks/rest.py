"""The KServe v2 REST API's speed, against floors measured in the same run: aiohttp's own
bare echo of the same bodies (the HTTP library the rest package is built on, with no
protocol, no tensors and no gate), and MLServer 1.7's REST infer of the same tensor.

    .venv/bin/python benchmarks/rest.py [--sizes 16M,256M] [--repeats 3] [--calls 1000]
        [--mlserver-python /tmp/venv-mlserver/bin/python] [--json results.json]

1. Binary infer of a float32 identity through tritonclient.http (binary data both
   ways: Triton's extension) against a bare aiohttp echo of a body of the same size,
   sent and read by the same HTTP client (geventhttpclient, tritonclient.http's own).
   Target (issue 30): >= 0.8 x the echo's throughput.
2. Small JSON infer ([1, 16] float32, JSON data both ways) p50, the request posted by
   the echo's own client (the same bytes), against the bare echo of the same JSON body,
   interleaved. Target: <= 1.3 x. tritonclient.http's own p50 is reported beside it
   (its request building and response parsing are the client's, not the server's).
3. MLServer 1.7 (in its own virtualenv: it conflicts with this one's pins) serving an
   identity MLModel over REST, the same tensor as JSON (MLServer's REST has no binary
   data), the first size only (JSON of 256 MiB of floats does not fit this machine).
   Target: tensorwire >= 5 x its throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from measuring import best_of, human, parse_size, start_process


def bare_echo(port_out: Connection) -> None:
    """In its own process: aiohttp's low-level server answering every POST with its
    own body, read into one buffer and written back in slices, as the rest package
    reads and writes bodies."""
    import asyncio

    from aiohttp import web, web_server

    async def echo(request: web.BaseRequest) -> web.StreamResponse:
        length = request.content_length or 0
        buffer = memoryview(np.empty(length, np.uint8)).cast("B")  # type: ignore[arg-type]
        filled = 0
        while filled < length:
            chunk = await request.content.readany()
            buffer[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        response = web.StreamResponse()
        response.content_length = length
        response.content_type = request.content_type
        await response.prepare(request)
        for start in range(0, length, 4 << 20):
            await response.write(buffer[start : start + (4 << 20)])
        await response.write_eof()
        return response

    async def serve() -> None:
        server = web_server.Server(echo, auto_decompress=False, access_log=None)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        port_out.send(listener.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(serve())


def start_tensorwire() -> tuple[subprocess.Popen[str], int]:
    """A tensorwire server process with REST on a free port, once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire_server", "--port", "0", "--http-port", "0",
         "--device", "cpu", "--no-data-plane"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        if match := re.search(r"REST on http://[\d.]+:(\d+)", line):
            port = int(match.group(1))
        if "server serving" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, port
    raise RuntimeError("tensorwire did not start")


IDENTITY_RUNTIME = """
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceResponse


class Identity(MLModel):
    async def predict(self, payload):
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("output", x)]
        )
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlserver(python: str, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """MLServer serving an identity MLModel from ``folder``, once it answers."""
    import urllib.request

    (folder / "identity_runtime.py").write_text(IDENTITY_RUNTIME)
    (folder / "model-settings.json").write_text(
        json.dumps({"name": "identity", "implementation": "identity_runtime.Identity"})
    )
    port = free_port()
    (folder / "settings.json").write_text(
        json.dumps({"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                    "parallel_workers": 0, "debug": False})
    )  # fmt: skip
    proc = subprocess.Popen(
        [python, "-m", "mlserver.cli.main", "start", str(folder)],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/identity/ready") as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("MLServer did not start")


def http_client(port: int, size: int) -> Any:
    from geventhttpclient import HTTPClient

    return HTTPClient("127.0.0.1", port, concurrency=1, connection_timeout=60, network_timeout=600)


def client_port(client: Any) -> int:
    """The port a tritonclient.http client talks to."""
    return int(client._parsed_url.port)


def post(client: Any, path: str, body: bytes, headers: dict[str, str]) -> int:
    response = client.post(path, body=body, headers=headers)
    data = response.read()
    assert response.status_code == 200, data[:300]
    return len(data)


def binary_rows(
    tw_port: int, echo_port: int, sizes: list[int], repeats: int
) -> list[dict[str, Any]]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{tw_port}", network_timeout=600)
    try:
        return [binary_row(client, echo_port, size, repeats) for size in sizes]
    finally:
        client.close()


def binary_row(client: Any, echo_port: int, size: int, repeats: int) -> dict[str, Any]:
    """One size: tritonclient.http's binary infer, then the bare echo of its body."""
    import tritonclient.http as httpclient

    x = np.ones(size // 4, np.float32)
    tensor = httpclient.InferInput("input", [x.size], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    wanted = [httpclient.InferRequestedOutput("output", binary_data=True)]

    def infer() -> None:
        result = client.infer("identity", [tensor], outputs=wanted)
        assert result.as_numpy("output").nbytes == size

    described = {"name": "input", "shape": [x.size], "datatype": "FP32",
                 "parameters": {"binary_data_size": size}}  # fmt: skip
    header = json.dumps({"inputs": [described]}).encode()
    body = header + x.tobytes()
    # The same request asking for its output as binary data (what infer() asks).
    out_header = json.dumps(
        {"inputs": [described], "parameters": {"binary_data_output": True}}
    ).encode()
    body_out = out_header + x.tobytes()
    echo = http_client(echo_port, len(body))
    headers = {"Inference-Header-Content-Length": str(len(header)),
               "Content-Type": "application/octet-stream"}  # fmt: skip
    raw = http_client(client_port(client), len(body))
    path = "/v2/models/identity/infer"
    binary_out = {**headers, "Inference-Header-Content-Length": str(len(out_header))}
    ours = best_of(repeats, infer)
    # The same bytes the echo gets, posted by the same client: the server's share alone.
    same = best_of(repeats, lambda: post(raw, path, body_out, binary_out))
    bare = best_of(repeats, lambda: post(echo, "/", body, headers))
    echo.close()
    raw.close()
    print(f"binary {human(size)}: tensorwire {2 * size / ours / 1e9:.2f} GB/s through "
          f"tritonclient.http, {2 * size / same / 1e9:.2f} GB/s with the echo's client; echo "
          f"{2 * size / bare / 1e9:.2f} GB/s; ratios {bare / ours:.2f}, {bare / same:.2f}",
          flush=True)  # fmt: skip
    return {"size": size, "tensorwire_s": ours, "same_client_s": same, "echo_s": bare,
            "tensorwire_GBps": 2 * size / ours / 1e9,
            "same_client_GBps": 2 * size / same / 1e9,
            "echo_GBps": 2 * size / bare / 1e9, "ratio": bare / ours,
            "same_client_ratio": bare / same}  # fmt: skip


def small_json(tw_port: int, echo_port: int, calls: int) -> dict[str, Any]:
    import tritonclient.http as httpclient

    x = np.ones((1, 16), np.float32)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{tw_port}")
    tensor = httpclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    wanted = [httpclient.InferRequestedOutput("output", binary_data=False)]
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    echo = http_client(echo_port, 65536)
    json_headers = {"Content-Type": "application/json"}
    raw = http_client(tw_port, 65536)  # the echo's own client, the same body
    ours, theirs, bare = [], [], []
    for i in range(calls + 100):  # interleaved: drift on a shared machine hits all
        began = time.perf_counter()
        client.infer("identity", [tensor], outputs=wanted)
        second = time.perf_counter()
        post(raw, "/v2/models/identity/infer", body, json_headers)
        third = time.perf_counter()
        post(echo, "/", body, json_headers)
        end = time.perf_counter()
        if i >= 100:
            theirs.append(second - began)
            ours.append(third - second)
            bare.append(end - third)
    client.close()
    raw.close()
    echo.close()
    p50, bare50, triton50 = (statistics.median(t) for t in (ours, bare, theirs))
    print(f"small JSON p50: tensorwire {p50 * 1e6:.0f} us (through tritonclient.http "
          f"{triton50 * 1e6:.0f} us), echo {bare50 * 1e6:.0f} us, ratio {p50 / bare50:.2f}",
          flush=True)  # fmt: skip
    return {"tensorwire_p50_us": p50 * 1e6, "tritonclient_p50_us": triton50 * 1e6,
            "echo_p50_us": bare50 * 1e6, "ratio": p50 / bare50}  # fmt: skip


def mlserver_row(python: str, size: int, tw_seconds: float, repeats: int) -> dict[str, Any]:
    import orjson

    with tempfile.TemporaryDirectory() as folder:
        proc, port = start_mlserver(python, Path(folder))
        try:
            x = np.ones(size // 4, np.float32)
            body = orjson.dumps({"inputs": [{"name": "input", "shape": [x.size],
                                             "datatype": "FP32", "data": x}]},
                                option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip
            client = http_client(port, 1 << 30)
            theirs = best_of(
                repeats,
                lambda: post(client, "/v2/models/identity/infer", body,
                             {"Content-Type": "application/json"}),
            )  # fmt: skip
            client.close()
        finally:
            proc.kill()
            proc.wait()
    ratio = theirs / tw_seconds
    print(f"MLServer {human(size)} (JSON): {2 * size / theirs / 1e9:.3f} GB/s; tensorwire "
          f"{ratio:.1f} x", flush=True)  # fmt: skip
    return {"size": size, "mlserver_s": theirs, "mlserver_GBps": 2 * size / theirs / 1e9,
            "tensorwire_over_mlserver": ratio}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16M,256M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--mlserver-python", default="/tmp/venv-mlserver/bin/python")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    echo, echo_pipe = start_process(bare_echo)
    echo_port = echo_pipe.recv()
    server, tw_port = start_tensorwire()
    results: dict[str, Any] = {"machine": f"{platform.node()} {os.cpu_count()} cores"}
    try:
        results["binary"] = binary_rows(tw_port, echo_port, sizes, args.repeats)
        results["small_json"] = small_json(tw_port, echo_port, args.calls)
    finally:
        server.kill()
        server.wait()
        echo.kill()
    if Path(args.mlserver_python).exists():
        first = results["binary"][0]
        results["mlserver"] = mlserver_row(
            args.mlserver_python, first["size"], first["tensorwire_s"], args.repeats
        )
    else:
        print(f"MLServer: no {args.mlserver_python}; skipped", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
