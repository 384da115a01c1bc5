"""The README's list of supported NumPy names is the code's, and the README's
before/after example runs (torch-free, in a fresh process) and agrees with NumPy."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import tensorwire.arrays as ta

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_exactly_the_supported_names() -> None:
    text = README.read_text()
    found = re.search(
        r"<!-- supported-numpy:begin -->\n(.*?)\n<!-- supported-numpy:end -->", text, re.S
    )
    assert found, "README.md lost its supported-numpy markers"
    assert found.group(1) == ta.supported_markdown(), (
        "README.md's list differs from the code: regenerate it with "
        "python -c 'import tensorwire.arrays as ta; print(ta.supported_markdown())'"
    )


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any "import torch" now raises ImportError
    import numpy as np
    import tensorwire as tw
    import tensorwire.arrays as ta

    def example(x):
        z = (x - x.mean(axis=0)) / x.std(axis=0)
        s = np.linalg.svd(z.T @ z / len(z), compute_uv=False)
        peak = np.abs(np.fft.rfft(z, axis=0)).sum(axis=1)[1:].argmax() + 1
        return s[:8] / s.sum(), peak

    data = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    with tw.Client(sys.argv[1], timeout=60) as client:
        x = ta.asarray(client, data)
        s, peak = example(x)
        want_s, want_peak = example(data)
        got = np.asarray(s)
        assert got.dtype == want_s.dtype == np.float32, got.dtype
        np.testing.assert_allclose(got, want_s, rtol=1e-4)
        assert int(peak) == int(want_peak)
        assert ta.round_trips(client) == 3  # the upload and two values
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m])
    print("ok")
    """
)


def test_readme_example_runs_without_torch(address: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, address], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
