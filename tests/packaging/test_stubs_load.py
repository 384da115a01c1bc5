"""The committed stubs load, with warnings as errors, on the protobuf and grpcio this
environment has (scripts/test-matrix runs this at both ends of the client's ranges), and
the client's floors are the versions of the toolchain that generated them."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT_STUBS = ROOT / "client" / "tensorwire" / "v1"
KSERVE_STUBS = ROOT / "server" / "tensorwire_server" / "kserve" / "v2"

LOAD = """
import importlib.util, sys, warnings
warnings.simplefilter("error")
import tensorwire
from tensorwire.v1 import tensorwire_pb2 as pb, tensorwire_pb2_grpc
# The KServe v2 messages: loaded from their file, so that no torch is needed here.
spec = importlib.util.spec_from_file_location("kserve_v2", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
request = pb.InferRequest(model="mlp")
request.inputs.add(name="x").tensor.shape.extend([2, 3])
assert pb.InferRequest.FromString(request.SerializeToString()) == request
assert module.ModelInferRequest(model_name="m").model_name == "m"
print("loaded")
"""


def floor(requirement: str) -> str:
    """The lowest X of ``name>=X...`` in the client's declared dependencies (on any
    Python: protobuf's floor is higher on 3.12 and newer)."""
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    floors = [
        match.group(1)
        for dependency in project["dependencies"]
        if (match := re.match(rf"{requirement}>=([\d.]+)", dependency))
    ]
    assert floors, f"client/pyproject.toml has no floor for {requirement}"
    return min(floors, key=lambda v: tuple(int(n) for n in v.split(".")))


def test_stubs_load_without_a_warning() -> None:
    # A fresh process: an earlier import in this one would hide a warning at import.
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", LOAD, str(KSERVE_STUBS / "grpc_service_pb2.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded"


def test_the_client_floors_are_the_generating_toolchain() -> None:
    # Gencode needs a runtime at least as new as itself; *_pb2_grpc.py asks for grpcio
    # at least as new as the grpcio-tools that wrote it.
    for stub in [*CLIENT_STUBS.glob("*_pb2.py"), *KSERVE_STUBS.glob("*_pb2.py")]:
        header = re.search(r"^# Protobuf Python Version: ([\d.]+)$", stub.read_text(), re.M)
        assert header, f"{stub.name}: no gencode version"
        assert header.group(1) == floor("protobuf"), stub.name
    grpc_stub = (CLIENT_STUBS / "tensorwire_pb2_grpc.py").read_text()
    generated = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", grpc_stub, re.M)
    assert generated and generated.group(1) == floor("grpcio")
    pin = re.search(r"^GRPCIO_TOOLS=([\d.]+)$", (ROOT / "scripts" / "gen-proto").read_text(), re.M)
    assert pin and pin.group(1) == floor("grpcio")
