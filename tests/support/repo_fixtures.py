"""Model repositories for tests: ``make_repository(root)`` writes two models with two
versions each, every version-file format among them; ``make_broken_model`` one that
cannot load.

``scaler`` (max_batch_size 32, dynamic batching with max_queue_delay_ms 1, one
instance, no warm-up): input ``input`` float32 ``[-1, 4]``, output ``output`` float32
``[-1, 4]``.

- version 1, ``1/model.pt`` (TorchScript): ``output = input * 2``
- version 2, ``2/model.pt2`` (torch.export, any batch size): ``output = input * 3``

``regressor`` (factory ``model.py:build``, an ``nn.Linear(4, 2)``; max_batch_size 8, no
dynamic batching): input ``input`` float32 ``[-1, 4]``, output ``output`` float32
``[-1, 2]``.

- version ``v`` in 1, 2, ``v/model.safetensors``:
  ``output = input @ W.T + b`` with ``W = [[1, 2, 3, 4], [-1, 0, 1, 2]] * v / 4`` and
  ``b = [0.5, -1] * v`` (``regressor_weights(v)``); integer inputs give exact results.

``expected_scaler(version, x)`` and ``expected_regressor(version, x)`` compute what each
version returns. The models are built by examples/make_model_repo.py, which writes the
README's example repository from the same code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_model_repo.py"
_spec = importlib.util.spec_from_file_location("make_model_repo", _SCRIPT)
assert _spec is not None and _spec.loader is not None
_example = importlib.util.module_from_spec(_spec)
sys.modules["make_model_repo"] = _example
_spec.loader.exec_module(_example)

SCALER_FACTORS: dict[int, float] = _example.SCALER_FACTORS
regressor_weights = _example.regressor_weights
expected_scaler = _example.expected_scaler
expected_regressor = _example.expected_regressor
#: The README's example repository (examples/model-repo), committed.
EXAMPLE_REPOSITORY = _SCRIPT.parent / "model-repo"

SCALER_TOML = """\
description = "input times 2 (version 1) or 3 (version 2)"
max_batch_size = 32

[[inputs]]
name = "input"
dtype = "float32"
shape = [-1, 4]

[[outputs]]
name = "output"
dtype = "float32"
shape = [-1, 4]

[dynamic_batching]
max_queue_delay_ms = 1
"""

REGRESSOR_TOML = """\
description = "a linear layer, 4 features in, 2 out"
factory = "model.py:build"
max_batch_size = 8

[[inputs]]
name = "input"
dtype = "float32"
shape = [-1, 4]

[[outputs]]
name = "output"
dtype = "float32"
shape = [-1, 2]
"""

BROKEN_TOML = """\
description = "version 1 is garbage bytes named model.pt"
"""


def make_repository(root: Path) -> Path:
    """Write ``scaler`` and ``regressor`` (see the module's docstring) under ``root``;
    return ``root``."""
    _example.write_scaler(root / "scaler", SCALER_TOML)
    _example.write_regressor(root / "regressor", REGRESSOR_TOML)
    return root


def make_broken_model(root: Path, name: str = "broken") -> Path:
    """Write model ``name`` under ``root``: a valid model.toml whose only version,
    ``1/model.pt``, is garbage bytes that no loader accepts; return its folder."""
    folder = root / name
    (folder / "1").mkdir(parents=True)
    (folder / "model.toml").write_text(BROKEN_TOML)
    (folder / "1" / "model.pt").write_bytes(b"this is not a TorchScript archive \x00\xff" * 4)
    return folder
