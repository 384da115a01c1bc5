"""The committed stubs are exactly what scripts/gen-proto makes from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "client" / "tensorwire" / "v1"


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True, env=env)
    fresh = sorted((tmp_path / "tensorwire" / "v1").glob("*_pb2*"))
    committed = sorted(GENERATED.glob("*_pb2*"))
    assert [p.name for p in fresh] == [p.name for p in committed]
    for new, old in zip(fresh, committed, strict=True):
        assert new.read_bytes() == old.read_bytes(), (
            f"{old.relative_to(ROOT)} drifted from proto/; run scripts/gen-proto and commit"
        )
