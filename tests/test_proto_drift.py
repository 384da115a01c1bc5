"""The committed stubs are exactly what scripts/gen-proto makes from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The generated packages and where each is committed: tensorwire.v1 (the contract, in
# the client package) and the KServe v2 protocol's messages (next to the server's KServe
# service, their only user).
PACKAGES = {"tensorwire/v1": "client", "tensorwire_server/kserve/v2": "server"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(out)], check=True, env=env)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_generated_stubs_match_proto(fresh: Path, package: str) -> None:
    new_files = sorted((fresh / package).glob("*_pb2*"))
    committed = sorted((ROOT / PACKAGES[package] / package).glob("*_pb2*"))
    assert new_files, f"scripts/gen-proto made nothing for {package}"
    assert [p.name for p in new_files] == [p.name for p in committed]
    for new, old in zip(new_files, committed, strict=True):
        assert new.read_bytes() == old.read_bytes(), (
            f"{old.relative_to(ROOT)} drifted from proto/; run scripts/gen-proto and commit"
        )


def test_kserve_messages_live_in_a_pool_of_their_own() -> None:
    # tritonclient's stubs declare the same inference.* names in the default pool.
    from google.protobuf import descriptor_pool

    from tensorwire_server.kserve.v2 import grpc_service_pb2

    assert grpc_service_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileByName(grpc_service_pb2.DESCRIPTOR.name)
