"""The two distributions this repository makes: `tensorwire` (client/, the client alone)
and `tensorwire-server` (server/), built as a user's builder would build them, with
complete metadata, in lockstep versions."""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECTS = {"tensorwire": ROOT / "client", "tensorwire-server": ROOT / "server"}


def project(name: str) -> dict[str, object]:
    table = tomllib.loads((PROJECTS[name] / "pyproject.toml").read_text())["project"]
    assert isinstance(table, dict)
    return table


VERSION = project("tensorwire")["version"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sdist and a wheel of each, built with `python -m build` (the wheel from the
    sdist, as an installer from the sdist would) and this environment's setuptools."""
    out = tmp_path_factory.mktemp("dist")
    for source in PROJECTS.values():
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return out


def wheel(dist: Path, name: str) -> zipfile.ZipFile:
    (path,) = dist.glob(f"{name.replace('-', '_')}-{VERSION}-py3-none-any.whl")
    return zipfile.ZipFile(path)


def metadata(archive: zipfile.ZipFile) -> Message:
    (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(archive.read(path))


def test_versions_move_in_lockstep() -> None:
    assert project("tensorwire-server")["version"] == VERSION
    assert f"tensorwire=={VERSION}" in project("tensorwire-server")["dependencies"]  # type: ignore[operator]


def test_each_distribution_carries_the_license() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    for source in PROJECTS.values():
        assert (source / "LICENSE").read_text() == license_text, f"{source.name}/LICENSE"


def test_the_client_wheel_holds_the_client_alone(dist: Path) -> None:
    archive = wheel(dist, "tensorwire")
    names = archive.namelist()
    assert all(n.startswith(("tensorwire/", f"tensorwire-{VERSION}.dist-info/")) for n in names)
    assert not any("tensorwire_server" in n for n in names)
    for expected in [
        "py.typed",
        "v1/tensorwire_pb2.py",
        "v1/tensorwire_pb2.pyi",
        "cli/__init__.py",
    ]:
        assert f"tensorwire/{expected}" in names
    meta = metadata(archive)
    requires = meta.get_all("Requires-Dist") or []
    assert {Requirement(r).name for r in requires} == {"grpcio", "ml_dtypes", "numpy", "protobuf"}
    assert not any("torch" in r for r in requires)
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    scripts = archive.read(entry_points).decode()
    assert "tensorwire = tensorwire.cli:main" in scripts
    assert "tensorwire-server" not in scripts


def test_the_server_wheel_brings_the_same_client_and_torch(dist: Path) -> None:
    archive = wheel(dist, "tensorwire-server")
    names = archive.namelist()
    assert all(n.startswith(("tensorwire_server/", "tensorwire_server-")) for n in names)
    assert "tensorwire_server/py.typed" in names
    assert "tensorwire_server/kserve/v2/grpc_service_pb2.pyi" in names
    requires = metadata(archive).get_all("Requires-Dist") or []
    assert f"tensorwire=={VERSION}" in requires
    assert "torch==2.13.0" in requires


@pytest.mark.parametrize("name", PROJECTS)
def test_metadata_is_complete(dist: Path, name: str) -> None:
    archive = wheel(dist, name)
    meta = metadata(archive)
    assert meta["Name"] == name and meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith(f"# {name}")  # the README
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.12" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Source", "Issues"} <= urls.keys()


@pytest.mark.parametrize("name", PROJECTS)
def test_the_sdist_rebuilds_alone(dist: Path, name: str) -> None:
    (path,) = dist.glob(f"{name.replace('-', '_')}-{VERSION}.tar.gz")
    with tarfile.open(path) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= names
    assert not any(n.startswith("tests/") for n in names)


def test_twine_accepts_every_artifact(dist: Path) -> None:
    artifacts = sorted(str(p) for p in dist.iterdir())
    assert len(artifacts) == 4
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *artifacts],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 4, done.stdout
