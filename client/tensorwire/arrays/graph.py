"""The pending computation: nodes the remote arrays build, and the programs that
compute some of them, cut into pieces of at most MAX_PROGRAM_STEPS steps.

A node is one program step (an allowlisted function and its arguments, which may be
other nodes' outputs) or a source: data the client holds, a tensor held on the server,
or a result already computed. Nothing here talks to the server: ``plan`` is a
generator that yields the Run calls to make and is sent their results, so that the
same plan drives ``Client`` and ``AsyncClient`` (see ``execute``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorwire.programs import Program
from tensorwire.wire.codec import Ref
from tensorwire.wire.protocol import MAX_PROGRAM_STEPS

# Local arrays up to this size travel inside the step that uses them.
_INLINE_BYTES = 1024


class Node:
    """One step of the graph, or a source (``data`` or ``tensor`` set)."""

    __slots__ = (
        "__weakref__",
        "args",
        "auto",
        "data",
        "function",
        "kept",
        "kwargs",
        "outputs",
        "tensor",
        "values",
    )

    def __init__(
        self,
        function: str = "",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        outputs: int = 1,
        data: np.ndarray | None = None,
        tensor: Any = None,
    ) -> None:
        self.function = function
        self.args = tuple(args)
        self.kwargs = kwargs or {}
        #: How many results the step has; 1: its result is the step's only output.
        self.outputs = outputs
        self.data = data
        self.tensor = tensor
        #: Results kept on the server by an earlier piece of a cut program, by output.
        self.kept: dict[int, Any] = {}
        #: Outputs in ``kept`` kept for live arrays (``keeping``), let go when unneeded.
        self.auto: set[int] = set()
        #: Results already brought back, by output.
        self.values: dict[int, np.ndarray] = {}


@dataclass(frozen=True, eq=False)
class Use:
    """One output of a node: what a remote array is, and what arguments name."""

    node: Node
    index: int = 0


@dataclass
class Call:
    """One Run call to make: the program, its inputs, the refs to return, whether they
    stay on the server, the loss and inputs to differentiate if any, and the refs kept
    on the server besides (for arrays that need them later)."""

    program: Program
    inputs: dict[str, Any]
    outputs: list[str]
    keep: bool
    loss: str | None = None
    wrt: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


#: Which outputs of a program's steps (its nodes, computing the wanted uses) live
#: arrays still need; the program keeps them (``keeping.Liveness.shared``).
Share = Callable[[Sequence[Node], Sequence[Use]], list[Use]]
#: Takes a result kept for live arrays (``keeping.Liveness.adopt``).
Adopt = Callable[[Use, Any], None]


def _adopt(use: Use, tensor: Any) -> None:
    use.node.kept[use.index] = tensor


def uses_in(value: Any) -> Iterator[Use]:
    """Every Use inside an argument (through lists, tuples and dict values)."""
    if isinstance(value, Use):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from uses_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from uses_in(item)


def _is_source(use: Use, cached: bool) -> bool:
    node = use.node
    # A gradient (cached False) must flow through every step back to the sources, so
    # results kept or brought back earlier count as sources only when not differentiating.
    return not node.function or (cached and (use.index in node.kept or use.index in node.values))


def _order(wanted: Sequence[Use], cached: bool) -> list[Node]:
    """The step nodes ``wanted`` needs, each after the nodes it reads."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [
        (u.node, False) for u in reversed(wanted) if not _is_source(u, cached)
    ]
    while stack:
        node, ready = stack.pop()
        if id(node) in seen:
            continue
        if ready:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        for use in uses_in((node.args, node.kwargs)):
            if not _is_source(use, cached) and id(use.node) not in seen:
                stack.append((use.node, False))
    return order


class _Builder:
    """One program being written: sources become inputs, nodes become steps."""

    def __init__(self, cached: bool) -> None:
        self.program = Program()
        self.inputs: dict[str, Any] = {}
        self.cached = cached
        self._input_refs: dict[tuple[int, int], Ref] = {}
        self._steps: dict[int, Ref] = {}
        self._keep_alive: list[Node] = []  # ids above stay valid while the plan runs

    def ref(self, use: Use) -> Ref:
        """The ref naming ``use`` in this program, declaring an input if it is a source."""
        node = use.node
        step = self._steps.get(id(node))
        if step is not None and not _is_source(use, self.cached):
            return step if node.outputs == 1 else Ref(f"{step.name}.output_{use.index}")
        key = (id(node), use.index)
        if key not in self._input_refs:
            name = f"a{len(self._input_refs)}"
            self._input_refs[key] = self.program.input(name)
            self.inputs[name] = source_value(use, self.cached)
            self._keep_alive.append(node)
        return self._input_refs[key]

    def add(self, node: Node) -> None:
        args = self._resolve(node.args)
        kwargs = {k: self._resolve(v) for k, v in node.kwargs.items()}
        self._steps[id(node)] = self.program.call(node.function, *args, **kwargs)
        self._keep_alive.append(node)

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, Use):
            return self.ref(value)
        if isinstance(value, np.ndarray) and value.nbytes > _INLINE_BYTES:
            # Local data used by several steps travels once, as a program input.
            key = (id(value), -1)
            if key not in self._input_refs:
                name = f"a{len(self._input_refs)}"
                self._input_refs[key] = self.program.input(name)
                self.inputs[name] = value
            return self._input_refs[key]
        if isinstance(value, list | tuple):
            return [self._resolve(v) for v in value]
        return value


def source_value(use: Use, cached: bool) -> Any:
    """What a source sends as a program input: data, or a server-held tensor."""
    node = use.node
    if use.index in node.kept:
        return node.kept[use.index]
    if cached and use.index in node.values:
        return node.values[use.index]
    return node.tensor if node.tensor is not None else node.data


def plan(
    wanted: Sequence[Use],
    *,
    loss: Use | None = None,
    wrt: Sequence[Use] = (),
    keep: bool = False,
    share: Share | None = None,
    adopt: Adopt = _adopt,
) -> Generator[Call, Any, tuple[list[Any], list[Any]]]:
    """Compute ``wanted`` (and, with ``loss``, its gradient with respect to the sources
    ``wrt``): yields the Run calls to make, is sent each call's ProgramResult, and
    returns the wanted values and the gradients (``keep``: nothing; the wanted values
    stay on the server, held by their nodes, for later programs). Graphs longer than
    one program are cut: each piece but the last keeps on the server what later pieces
    read. ``share``: what else live arrays need of the steps, kept by the same calls
    and given to ``adopt`` (a gradient's program keeps nothing more)."""
    differentiate = loss is not None
    cached = not differentiate  # a gradient must flow through every step, so recompute
    targets = [*wanted, *([loss] if loss is not None else [])]
    order = _order(targets, cached)
    shared = share(order, wanted) if share is not None and not differentiate else []
    if differentiate and len(order) > MAX_PROGRAM_STEPS:
        raise ValueError(
            f"the gradient's graph has {len(order)} steps; one program has at most "
            f"{MAX_PROGRAM_STEPS}: compute part of it first"
        )
    pieces = [order[i : i + MAX_PROGRAM_STEPS] for i in range(0, len(order), MAX_PROGRAM_STEPS)]
    piece_of = {id(n): number for number, p in enumerate(pieces) for n in p}
    explicit = {(id(u.node), u.index) for u in wanted} if keep else set()
    for number, piece in enumerate(pieces[:-1]):
        later = {id(n) for p in pieces[number + 1 :] for n in p}
        needed = [
            u
            for n in (node for p in pieces[number + 1 :] for node in p)
            for u in uses_in((n.args, n.kwargs))
            if not _is_source(u, cached) and id(u.node) not in later
        ] + [u for u in targets if not _is_source(u, cached) and id(u.node) not in later]
        needed = list({(id(u.node), u.index): u for u in needed}.values())
        # What live arrays need besides, kept apart (so the call can run without it).
        besides = {(id(u.node), u.index) for u in needed}
        extra = [
            u
            for u in shared
            if piece_of[id(u.node)] == number and (id(u.node), u.index) not in besides
        ]
        builder = _Builder(cached)
        for node in piece:
            builder.add(node)
        refs = [builder.ref(u).name for u in needed]
        kept = [builder.ref(u).name for u in extra]
        result = yield Call(builder.program, builder.inputs, refs, keep=True, kept=kept)
        for use, ref in zip(needed, refs, strict=True):
            # Kept for the pieces after it: let go, like the shared ones, once unneeded.
            (_adopt if (id(use.node), use.index) in explicit else adopt)(use, result[ref])
        _take_kept(result, extra, kept, adopt)
    builder = _Builder(cached)
    for node in pieces[-1] if pieces else ():
        builder.add(node)
    if not builder.program.steps:  # every target is a source already
        return ([] if keep else [source_value(u, cached) for u in wanted]), []
    refs = [builder.ref(u).name for u in wanted]
    last = len(pieces) - 1
    extra = [
        u for u in shared if piece_of[id(u.node)] == last and (id(u.node), u.index) not in explicit
    ]
    kept = [builder.ref(u).name for u in extra]
    if keep:
        result = yield Call(builder.program, builder.inputs, refs, keep=True, kept=kept)
        for use, ref in zip(wanted, refs, strict=True):
            use.node.kept[use.index] = result[ref]
        _take_kept(result, extra, kept, adopt)
        return [], []
    wrt_names = [builder.ref(u).name for u in wrt]
    loss_ref = builder.ref(loss).name if loss is not None else None
    result = yield Call(builder.program, builder.inputs, refs, False, loss_ref, wrt_names, kept)
    _take_kept(result, extra, kept, adopt)
    return [result[r] for r in refs], [result.grads[n] for n in wrt_names]


def _take_kept(result: Any, uses: Sequence[Use], refs: Sequence[str], adopt: Adopt) -> None:
    """Hold what a call kept besides its outputs (nothing when it ran without: see
    ``execute``, past the session's quota)."""
    for use, ref in zip(uses, refs, strict=True):
        tensor = result.kept.get(ref)
        if tensor is not None:
            adopt(use, tensor)
