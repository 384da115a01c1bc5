"""What stays on the server between materialisations.

A program computes every intermediate its value needs; other arrays, alive and not
yet computed, may need some of them too (an SVD several results read). The Run that
computes such an intermediate also keeps it in the session (its ``kept`` refs), so
later programs start from it instead of computing it again; once no live array needs
it, it is let go (its RemoteTensor dropped: the client frees it with its next call).
So the session holds, besides what ``persist`` kept, only what live arrays still need.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from tensorwire.arrays.graph import Node, Use, uses_in

Key = tuple[int, int]


def key(use: Use) -> Key:
    """What identifies one output of one node."""
    return (id(use.node), use.index)


def reach(roots: Iterable[Use], collect: Callable[[Use], bool]) -> dict[Key, Use]:
    """The uses ``collect`` picks where the graphs of ``roots`` reach them, walking
    back through the steps not computed yet (results brought back or kept, and data,
    end a walk): nothing beyond a picked use is walked."""
    found: dict[Key, Use] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        use = stack.pop()
        if collect(use):
            found[key(use)] = use
            continue
        node = use.node
        if not node.function or use.index in node.values or use.index in node.kept:
            continue
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(uses_in((node.args, node.kwargs)))
    return found


class Liveness:
    """One client's remote arrays, weakly, and the results kept for them."""

    def __init__(self) -> None:
        self._arrays: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._numbers = itertools.count()
        # Nodes holding results kept for live arrays (Node.auto names the outputs).
        self._holders: weakref.WeakSet[Node] = weakref.WeakSet()

    def track(self, array: Any) -> None:
        """Count ``array`` (a RemoteArray) among the live ones while it lives."""
        self._arrays[next(self._numbers)] = array

    def pending(self, besides: Iterable[Use] = (), kept: bool = False) -> list[Use]:
        """The uses of live arrays not brought back yet (``kept``: also those kept on
        the server, whose values live arrays need), except ``besides``."""
        skip = {key(u) for u in besides}
        arrays = [ref() for ref in self._arrays.valuerefs()]
        uses = (array._use for array in arrays if array is not None)
        return [
            u
            for u in uses
            if u.node.function
            and u.index not in u.node.values
            and (kept or u.index not in u.node.kept)
            and key(u) not in skip
        ]

    def shared(self, steps: Iterable[Node], wanted: Iterable[Use]) -> list[Use]:
        """The outputs of ``steps`` (a program computing ``wanted``) that other live
        arrays still need: the ones the program should keep."""
        ids = {id(n) for n in steps}

        def computed_there(u: Use) -> bool:
            node = u.node  # a step computed there, and this output not already here
            return id(node) in ids and u.index not in node.values and u.index not in node.kept

        return list(reach(self.pending(besides=wanted), computed_there).values())

    def adopt(self, use: Use, tensor: Any) -> None:
        """Hold ``tensor``, kept on the server for live arrays, as ``use``'s result."""
        use.node.kept[use.index] = tensor
        use.node.auto.add(use.index)
        self._holders.add(use.node)

    def release(self) -> int:
        """Let go of the results kept for arrays that no live array needs any more;
        how many. Results ``persist`` kept stay while their arrays live."""
        needed = reach(self.pending(kept=True), lambda u: u.index in u.node.kept)
        dropped = 0
        for node in list(self._holders):
            for index in [i for i in node.auto if (id(node), i) not in needed]:
                node.auto.discard(index)
                node.kept.pop(index, None)  # its RemoteTensor goes: freed on the next call
                dropped += 1
        return dropped

    def held(self) -> int:
        """How many results are kept for live arrays now."""
        return sum(len(node.auto) for node in list(self._holders))
