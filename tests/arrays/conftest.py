"""Remote NumPy arrays reproduce NumPy 2's semantics (NEP 50) and need NumPy 2: under
NumPy 1 (the client's lowest supported versions, scripts/test-matrix) their tests are
not collected, and one test checks that importing them says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUMPY_1 = int(np.__version__.split(".")[0]) < 2


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if NUMPY_1 and collection_path.name.startswith("test_arrays_"):
        return True
    return None
