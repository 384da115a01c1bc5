"""Warm restarts: a server with --compile-cache-dir keeps what torch.compile made, so the
next one started over the same directory finds every graph in it; a corrupt cache is
a miss, not a failure. Each server is a process of its own (the cache directory is
set once per process)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from support.compiled_fixtures import FEATURES, HIDDEN, MAX_BATCH, example
from support.servers import spawn_server

import tensorwire as tw

pytestmark = pytest.mark.timeout(300)

_COMPILED = re.compile(
    r"model 'mixer' compiled \(default\) in warm-up in [\d.]+ s: (\d+) graphs, (\d+) found in the "
    r"compile cache, (\d+) not"
)


def serve_once(root: Path, cache: Path) -> tuple[int, int, int]:
    """Start a server over ``root`` with ``cache``, check that the mixer serves
    compiled and computes what eager PyTorch does; return its compile log's counts:
    graphs, cache hits, cache misses."""
    flags = ("--device", "cpu", "--no-builtins", "--model-repo", str(root))
    module = example.build_mixer(root / "mixer")
    with spawn_server(*flags, "--compile-cache-dir", str(cache)) as (_, address, lines):
        with tw.Client(address, timeout=60) as client:
            info = client.info().models["mixer"]
            assert (info.state, info.execution, info.recompilations) == ("READY", "compiled", 0)
            x = np.random.default_rng(0).standard_normal((3, FEATURES)).astype(np.float32)
            out = client.infer("mixer", {"input": x})["output"]
        found = [m for line in lines if (m := _COMPILED.search(line))]
    with torch.no_grad():
        np.testing.assert_allclose(out, module(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    assert found, "".join(lines)
    graphs, hits, misses = (int(n) for n in found[0].groups())
    assert graphs == info.compiled_graphs
    return graphs, hits, misses


def test_a_restart_finds_every_graph_in_the_cache_and_a_corrupt_one_is_a_miss(
    tmp_path: Path,
) -> None:
    root = tmp_path / "repo"
    example.write_repository(
        root, features=FEATURES, hidden=HIDDEN, depth=1, max_batch_size=MAX_BATCH, aoti=False
    )
    cache = tmp_path / "cache"
    graphs, hits, misses = serve_once(root, cache)
    assert graphs >= 2  # one row and several
    assert (hits, misses > 0) == (0, True)
    kept = cache / f"torch-{torch.__version__}"
    assert any(kept.rglob("*")), "nothing was cached"

    again = serve_once(root, cache)
    assert again[0] == graphs
    assert again[1] > 0 and again[2] == 0  # every lookup found its graph: nothing compiled

    for file in kept.rglob("*"):
        if file.is_file():
            file.write_bytes(b"not what was cached")
    corrupt = serve_once(root, cache)  # still serves compiled: the entries were misses
    assert corrupt[0] == graphs
    assert corrupt[2] > 0
