"""The client imports and works in a fresh process where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any "import torch" now raises ImportError
    import numpy as np
    import tensorwire as tw
    from tensorwire import cli, errors, types
    from tensorwire.wire import codec, dtypes, framing, protocol, streaming
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m])
    assert not any(m.startswith("tensorwire_server") for m in sys.modules)
    with tw.Client(sys.argv[1], timeout=30) as c:
        assert "mlp" in c.info().models
        x = np.ones((2, 16), np.float32)
        assert c.infer("mlp", x)["output"].shape == (2, 4)
        g = c.grad("mlp", x, grad_outputs=np.ones((2, 4), np.float32))
        assert g.grads["input"].shape == (2, 16)
        assert c.call("matmul", np.eye(2), np.ones((2, 2))).tolist() == [[1, 1], [1, 1]]
    with tw.Client(sys.argv[1], timeout=30, stream_threshold=0, chunk_size=3) as c:
        assert c.infer("identity", np.arange(10))["output"].tolist() == list(range(10))
    print("ok")
    """
)


def test_client_works_where_torch_cannot_be_imported(address: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, address], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
