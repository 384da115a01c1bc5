"""The allowlist's numpy.* entries refuse bad arguments with INVALID_ARGUMENT naming
what was wrong, and the server goes on serving."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorwire import Client
from tensorwire.errors import InvalidArgumentError

X = np.arange(24.0).reshape(2, 3, 4)

BAD: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("numpy.cast", (X, "float128"), {}, "not a dtype name"),
    ("numpy.cast", (X, 3), {}, "not a dtype name"),
    ("numpy.index", (X, [0, 0, 0, 0]), {}, "too many indices"),
    ("numpy.index", (X, ["...", "..."]), {}, "single ellipsis"),
    ("numpy.index", (X, [5]), {}, "out of bounds"),
    ("numpy.index", (X, [[0, 1, 0]]), {}, "step cannot be zero"),
    ("numpy.index", (X, [[0, 1]]), {}, "an index item is"),
    ("numpy.index", (X, [[0.5, 1, 1]]), {}, "a slice is"),
    ("numpy.index", (X, ["x"]), {}, "an index item is"),
    ("numpy.index", (X, [True]), {}, "an index item is"),
    ("numpy.index", (X, [None] * 65), {}, "at most 64"),
    # 64 new axes on a 3-D array: a result NumPy cannot hold, refused by the export.
    ("numpy.index", (X, [None] * 64), {}, "67 dimensions; at most 64"),
    ("numpy.apply", ("numpy.apply", X), {}, "not an allowlisted function"),
    ("numpy.apply", ("zeros", 3), {}, "not an allowlisted function"),
    ("numpy.apply", ("add", X, X), {"casts": ["float64"]}, "one entry"),
    ("numpy.apply", ("add", X, X), {"casts": ["float64", "object"]}, "not a dtype name"),
    ("numpy.apply", ("add", X, X), {"results": "str"}, "not a dtype name"),
    ("numpy.apply", ("add", X, X), {"results": ["float64", "float64"]}, "does not return"),
    ("numpy.apply", ("sort", X), {"results": ["float64"] * 3}, "returned 2 results"),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "message"), BAD, ids=[b[3] for b in BAD])
def test_bad_arguments_are_invalid_argument(
    client: Client, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        client.call(name, *args, **kwargs)
    np.testing.assert_array_equal(client.call("numpy.index", X, [1, -1]), X[1, -1])


def test_index_matches_numpy_for_negative_steps(client: Client) -> None:
    for spec, key in [
        ([[None, None, -1]], np.s_[::-1]),
        ([[None, None, -2], [2, None, -1]], np.s_[::-2, 2::-1]),
        (["...", [3, 0, -2]], np.s_[..., 3:0:-2]),
        ([[0, 2, -1]], np.s_[0:2:-1]),
    ]:
        got = client.call("numpy.index", X, spec)
        np.testing.assert_array_equal(got, X[key])
