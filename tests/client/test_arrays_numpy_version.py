"""tensorwire.arrays under NumPy 1: a clear ImportError naming what it needs; the rest of
the client imports as ever."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import tensorwire as tw


@pytest.mark.skipif(int(np.__version__.split(".")[0]) >= 2, reason="NumPy 2 is installed")
def test_remote_arrays_refuse_numpy_1_by_name() -> None:
    assert tw.Client  # the client itself works
    with pytest.raises(ImportError, match="NumPy 2 or newer"):
        importlib.import_module("tensorwire.arrays")


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="NumPy 1 is installed")
def test_remote_arrays_import_under_numpy_2() -> None:
    assert importlib.import_module("tensorwire.arrays").supported()
