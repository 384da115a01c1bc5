"""Does the tensorwire client install beside the other inference clients without
downgrading any of them, and does each of them then work?

    python scripts/coexistence.py [--wheel CLIENT.whl] [--target HOST:PORT]

In one fresh virtual environment (this interpreter's Python), pip resolves each of
``tritonclient[grpc]``, ``tritonclient[http]``, ``mlserver``, ``kserve`` and
``ray[serve]`` alone (``pip install --dry-run --report``), then the client together
with each of them pinned to the release it resolved to alone: the run fails if that
has no resolution, i.e. if the client would force any of them down. (Unpinned, the
peers' own conflicts decide: pip backtracks for over ten minutes, and uv settles on
mlserver 1.2.1 with or without tensorwire, since mlserver 1.7.1 and kserve 0.21 can
be installed together but a resolver need not find that.) Then everything is installed, each package
imported, and one call made with each client that speaks to a server: tensorwire's
own, tritonclient's gRPC v2 client, kserve's ``InferenceGRPCClient`` and mlserver's
v2 gRPC stubs, against ``--target`` or a CPU server started here (this interpreter
must then have tensorwire-server: the development environment).

Exit status 0: all held; 1: a downgrade or a failed call; 77: skipped, because the
package index does not answer (it says so). Time is bounded: every pip and every call
has a deadline. The tests run it: tests/packaging/test_coexistence.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ["tritonclient[grpc]", "tritonclient[http]", "mlserver", "kserve", "ray[serve]"]
SKIPPED = 77
PIP_SECONDS = 600  # one resolution or the install; a cold pip cache downloads ~1 GB

# Run in the fresh environment: import every peer, then one call with each client.
CALLS = r"""
import asyncio, sys
import numpy as np
target = sys.argv[1]
x = np.ones((2, 16), np.float32)

import tensorwire as tw
with tw.Client(target, timeout=30) as c:
    assert c.infer("mlp", x)["output"].shape == (2, 4)
print("tensorwire: Client.infer('mlp') -> (2, 4)")

import tritonclient.grpc as triton
import tritonclient.http  # noqa: F401  (the server speaks gRPC only: imported, not called)
with triton.InferenceServerClient(target) as c:
    assert c.is_server_live() and c.is_model_ready("mlp")
    i = triton.InferInput("input", [2, 16], "FP32")
    i.set_data_from_numpy(x)
    y = c.infer("mlp", [i]).as_numpy("output")
    assert y.shape == (2, 4)
print("tritonclient.grpc: is_server_live, is_model_ready, infer('mlp') -> (2, 4)")

import grpc
from mlserver.grpc import dataplane_pb2 as mpb, dataplane_pb2_grpc as mgrpc
with grpc.insecure_channel(target) as channel:
    stub = mgrpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(mpb.ServerLiveRequest(), timeout=30).live
    meta = stub.ModelMetadata(mpb.ModelMetadataRequest(name="mlp"), timeout=30)
    assert [t.name for t in meta.inputs] == ["input"]
print("mlserver.grpc: ServerLive, ModelMetadata('mlp') -> inputs ['input']")

from kserve import InferenceGRPCClient, InferInput, InferRequest

async def kserve_call():
    client = InferenceGRPCClient(target, timeout=30)
    try:
        assert await client.is_server_ready()
        i = InferInput("input", [2, 16], "FP32")
        i.set_data_from_numpy(x, binary_data=True)
        response = await client.infer(InferRequest(model_name="mlp", infer_inputs=[i]))
        return response.outputs[0].as_numpy().shape
    finally:
        await client.close()

assert asyncio.run(kserve_call()) == (2, 4)
print("kserve: InferenceGRPCClient.is_server_ready, infer('mlp') -> (2, 4)")

import ray, ray.serve  # noqa: E401  (a serving framework: no client of a remote server)
print(f"ray[serve]: imported ray {ray.__version__}")
"""


def run(argv: Sequence[str], timeout: float = PIP_SECONDS) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        noise = re.compile(r"WARNING: Location .* is ignored")
        stderr = "\n".join(line for line in done.stderr.splitlines() if not noise.search(line))
        raise RuntimeError(f"{' '.join(argv[:4])}... failed:\n{stderr[-4000:]}")
    return done.stdout


def index_answers(python: str) -> bool:
    """Whether pip's index has the peers (the index pip is configured with)."""
    try:
        run([python, "-m", "pip", "index", "versions", "tritonclient"], timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


def resolve(python: str, specs: Sequence[str], report: Path) -> dict[str, str]:
    """What pip would install for ``specs`` in an empty environment: name -> version."""
    pip = [python, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
    run([*pip, "--report", str(report), *specs])
    chosen = json.loads(report.read_text())["install"]
    return {
        p["metadata"]["name"].lower().replace("_", "-"): p["metadata"]["version"] for p in chosen
    }


def name_of(spec: str) -> str:
    return spec.split("[")[0].lower()


def build_wheel(out: Path) -> Path:
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--outdir",
            str(out),
            str(ROOT / "client"),
        ]
    )
    (wheel,) = out.glob("tensorwire-*.whl")
    return wheel


@contextmanager
def server() -> Iterator[str]:
    """A CPU server with the built-in models, from this interpreter, on loopback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire_server", "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        address = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if match := re.search(r"listening on ([\w.:\[\]-]+)", line):
                address = match.group(1)
            if "server serving" in line and address:
                yield address
                return
        raise RuntimeError("the tensorwire server did not start")
    finally:
        proc.kill()
        proc.wait(30)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="the client's wheel (default: built here)")
    parser.add_argument("--target", help="a running server (default: one started here)")
    options = parser.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="tensorwire-coexistence-") as tmp:
        work = Path(tmp)
        run([sys.executable, "-m", "venv", str(work / "venv")], timeout=120)
        python = str(work / "venv" / "bin" / "python")
        if not index_answers(python):
            print("coexistence: SKIPPED, the package index does not answer (pip index versions)")
            return SKIPPED
        wheel = options.wheel or build_wheel(work / "dist")
        started = time.monotonic()
        with ThreadPoolExecutor(len(PEERS)) as pool:
            alone = dict(
                zip(
                    PEERS,
                    pool.map(
                        lambda i: resolve(python, [PEERS[i]], work / f"alone-{i}.json"),
                        range(len(PEERS)),
                    ),
                    strict=True,
                )
            )
        # Each peer at the release it resolves to alone: a downgrade would be a conflict.
        newest = [f"{peer}=={alone[peer][name_of(peer)]}" for peer in PEERS]
        try:
            together = resolve(python, [str(wheel), *newest], work / "together.json")
        except RuntimeError as error:
            print(f"coexistence: FAILED, no resolution with {' '.join(newest)}:\n{error}")
            try:
                resolve(python, newest, work / "peers.json")
            except RuntimeError:
                print("  (the peers conflict among themselves, without tensorwire too)")
            return 1
        print(f"coexistence: resolved in {time.monotonic() - started:.0f} s")
        for peer in PEERS:
            own, joint = alone[peer][name_of(peer)], together[name_of(peer)]
            print(f"  {peer:20} alone {own:12} with tensorwire {joint:12} same")
        shared = ", ".join(
            f"{n} {together[n]}" for n in ("tensorwire", "protobuf", "grpcio", "numpy")
        )
        print(f"  together: {shared}")
        started = time.monotonic()
        run([python, "-m", "pip", "install", "--quiet", str(wheel), *newest])
        print(f"coexistence: installed in {time.monotonic() - started:.0f} s")
        with server() if options.target is None else _given(options.target) as target:
            print(run([python, "-c", CALLS, target], timeout=180), end="")
        print("coexistence: OK, no peer downgraded, every client answered")
        return 0


@contextmanager
def _given(target: str) -> Iterator[str]:
    yield target


if __name__ == "__main__":
    sys.exit(main())
