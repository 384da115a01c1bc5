"""Named values: what a request carries and a result returns, as (name, value) pairs."""

from __future__ import annotations

from typing import TypeAlias, TypeVar

T = TypeVar("T")

#: Values by name, in order (a name may be empty, a position then): ``Named[np.ndarray]``
#: for arrays, ``Named[Any]`` where a session's device tensors may stand among them.
Named: TypeAlias = list[tuple[str, T]]

__all__ = ["Named"]
