"""Does the tensorwire client install beside the other inference clients without
downgrading any of them, and does each of them then work?

    python scripts/coexistence.py [--wheel CLIENT.whl] [--target HOST:PORT]

In one fresh virtual environment (this interpreter's Python) it resolves, with uv
(installed there: pip's resolver backtracks for over ten minutes over these peers):

1. each of ``tritonclient[grpc]``, ``tritonclient[http]``, ``mlserver``, ``kserve`` and
   ``ray[serve]`` alone: the release each gets alone;
2. the client with each peer pinned to that release: each must resolve, so the client
   forces none of them down;
3. all the peers together, without the client and with it: the client must move none
   of them. (The newest peers conflict among themselves: mlserver 1.7.1 needs
   fastapi < 0.116 and ray[serve] 2.60 fastapi >= 0.133, so together a resolver takes
   an older mlserver, with or without tensorwire. The table shows both.)

Then it installs the joint resolution (with uv: the resolution is settled), imports
each package and makes one call with each client that speaks to a server: tensorwire's
own, tritonclient's gRPC v2 client, kserve's ``InferenceGRPCClient`` and mlserver's
v2 gRPC stubs, against
``--target`` or a CPU server started here (this interpreter must then have
tensorwire-server: the development environment).

Exit status 0: all held; 1: a downgrade or a failed call; 77: skipped, because the
package index does not answer (it says so). Time is bounded: every pip and every call
has a deadline. The tests run it: tests/packaging/test_coexistence.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ["tritonclient[grpc]", "tritonclient[http]", "mlserver", "kserve", "ray[serve]"]
SKIPPED = 77
PIP_SECONDS = 600  # one resolution or the install; a cold pip cache downloads ~1 GB

# Run in the fresh environment: one call with each client, each a section of its own.
PRELUDE = """
import asyncio, sys
import numpy as np
target = sys.argv[1]
x = np.ones((2, 16), np.float32)
"""
CALLS = {
    "tensorwire": """
import tensorwire as tw
with tw.Client(target, timeout=30) as c:
    assert c.infer("mlp", x)["output"].shape == (2, 4)
print("  tensorwire: Client.infer('mlp') -> (2, 4)")
""",
    "tritonclient": """
import tritonclient.grpc as triton
import tritonclient.http  # the server speaks gRPC only: imported, not called
with triton.InferenceServerClient(target) as c:
    assert c.is_server_live() and c.is_model_ready("mlp")
    i = triton.InferInput("input", [2, 16], "FP32")
    i.set_data_from_numpy(x)
    assert c.infer("mlp", [i]).as_numpy("output").shape == (2, 4)
print("  tritonclient.grpc: is_server_live, is_model_ready, infer('mlp') -> (2, 4)")
""",
    "kserve": """
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
print("  kserve: InferenceGRPCClient.is_server_ready, infer('mlp') -> (2, 4)")
""",
    "mlserver": """
import grpc
import mlserver
from mlserver.grpc import dataplane_pb2 as mpb, dataplane_pb2_grpc as mgrpc
with grpc.insecure_channel(target) as channel:
    stub = mgrpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(mpb.ServerLiveRequest(), timeout=30).live
    meta = stub.ModelMetadata(mpb.ModelMetadataRequest(name="mlp"), timeout=30)
    assert [t.name for t in meta.inputs] == ["input"]
print(f"  mlserver {mlserver.__version__}: v2 gRPC ServerLive, ModelMetadata('mlp')")
""",
    "ray[serve]": """
import ray, ray.serve  # a serving framework: no client of a remote server to call
print(f"  ray[serve]: imported ray {ray.__version__}")
""",
}


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


def resolve(python: str, specs: Sequence[str], out: Path) -> dict[str, str]:
    """What an empty environment of ``python`` gets for ``specs``: name -> version (and
    the pinned list in ``out``, for pip to install)."""
    out.with_suffix(".in").write_text("\n".join(specs) + "\n")
    uv = str(Path(python).parent / "uv")
    compile_ = [uv, "pip", "compile", "--quiet", "--python", python, "--no-header"]
    run([*compile_, "--no-annotate", "--output-file", str(out), str(out.with_suffix(".in"))])
    chosen = {}
    for line in out.read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line:  # the client's wheel: its version is in its file's name
            name, url = line.split(" @ ", 1)
            version = re.search(r"-(\d[\w.]*)-py3", url).group(1)  # type: ignore[union-attr]
        else:
            continue
        chosen[name.strip().lower().replace("_", "-")] = version.strip()
    return chosen


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
                # Keep reading: a server blocked on a full stderr pipe would hang.
                drain = threading.Thread(
                    target=collections.deque, args=(proc.stderr, 0), daemon=True
                )
                drain.start()
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
        run([python, "-m", "pip", "install", "--quiet", "uv"])
        started = time.monotonic()
        client = f"tensorwire @ {wheel.resolve().as_uri()}"
        with ThreadPoolExecutor(len(PEERS)) as pool:
            alone = list(
                pool.map(
                    lambda i: resolve(python, [PEERS[i]], work / f"alone{i}.txt"), range(len(PEERS))
                )
            )
            newest = [f"{p}=={a[name_of(p)]}" for p, a in zip(PEERS, alone, strict=True)]
            pairs = list(
                pool.map(
                    lambda i: _resolves(python, [client, newest[i]], work / f"pair{i}.txt"),
                    range(len(PEERS)),
                )
            )
        peers = resolve(python, PEERS, work / "peers.txt")
        together = resolve(python, [client, *PEERS], work / "together.txt")
        print(f"coexistence: resolved in {time.monotonic() - started:.0f} s")
        head = ("alone", "tensorwire + it", "all peers", "+ tensorwire")
        print(f"  {'':20} {head[0]:>10} {head[1]:>16} {head[2]:>10} {head[3]:>13}")
        failed = []
        for peer, own, pair in zip(PEERS, alone, pairs, strict=True):
            name = name_of(peer)
            moved = together[name] != peers[name]
            if pair is None or moved:
                failed.append(peer)
            with_it = "no solution" if pair is None else pair[name]
            print(
                f"  {peer:20} {own[name]:>10} {with_it:>16} {peers[name]:>10} {together[name]:>13}"
            )
        shared = ", ".join(
            f"{n} {together[n]}" for n in ("tensorwire", "protobuf", "grpcio", "numpy")
        )
        print(f"  all together: {shared}")
        if failed:
            print(f"coexistence: FAILED, tensorwire downgrades {', '.join(failed)}")
            return 1
        started = time.monotonic()
        # The resolution is settled: uv installs it, in a fraction of pip's time.
        uv = str(Path(python).parent / "uv")
        run([uv, "pip", "install", "--quiet", "--python", python, "-r", str(work / "together.txt")])
        print(f"coexistence: installed in {time.monotonic() - started:.0f} s")
        with server() if options.target is None else _given(options.target) as target:
            print("coexistence: one call with each client, all in that one environment")
            for section, code in CALLS.items():
                try:
                    print(run([python, "-c", PRELUDE + code, target], timeout=180), end="")
                except RuntimeError as error:
                    if section != "mlserver":
                        print(f"coexistence: FAILED, {section}:\n{error}")
                        return 1
                    # The peers' own compromise: the mlserver that fits beside the newest
                    # kserve and ray[serve] (fastapi), with or without tensorwire.
                    why = str(error).strip().splitlines()[-1]
                    print(f"  mlserver {together['mlserver']} (the peers' compromise) does not")
                    print(f"    import: {why}")
                    # So the newest mlserver again, beside tensorwire alone.
                    pair = work / "venv-mlserver"
                    run([sys.executable, "-m", "venv", str(pair)], timeout=120)
                    pair_python = str(pair / "bin" / "python")
                    pins = str(work / "pair2.txt")  # tensorwire + the newest mlserver
                    run([uv, "pip", "install", "--quiet", "--python", pair_python, "-r", pins])
                    print(f"  and in an environment of tensorwire with {newest[2]}:")
                    for again in ("tensorwire", "mlserver"):
                        code = PRELUDE + CALLS[again]
                        print(run([pair_python, "-c", code, target], timeout=180), end="")
        print("coexistence: OK, tensorwire downgrades no peer, every client answered")
        return 0


def _resolves(python: str, specs: Sequence[str], out: Path) -> dict[str, str] | None:
    try:
        return resolve(python, specs, out)
    except RuntimeError:
        return None


@contextmanager
def _given(target: str) -> Iterator[str]:
    yield target


if __name__ == "__main__":
    sys.exit(main())
