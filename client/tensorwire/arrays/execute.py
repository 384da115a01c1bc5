"""Running plans: the client a graph belongs to, and the loops that drive a plan
through ``Client.run`` (blocking) or ``AsyncClient.run`` (awaited), counting the
round trips they make, keeping what live arrays still need and letting go of the
rest (``keeping``)."""

from __future__ import annotations

import inspect
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from tensorwire.arrays.graph import Call, Use, plan
from tensorwire.arrays.keeping import Liveness
from tensorwire.errors import ResourceExhaustedError


class Context:
    """The client whose server holds a graph's tensors, and the round trips made."""

    def __init__(self, client: Any) -> None:
        self.client = client
        # AsyncClient's methods are coroutines; which client it is decides which
        # materialisations are allowed (blocking ones or awaited ones).
        self.is_async = inspect.iscoroutinefunction(getattr(type(client), "run", None))
        #: Round trips this context's materialisations made (Run and Get calls).
        self.round_trips = 0
        #: Its live arrays, and the results kept on the server for them.
        self.liveness = Liveness()

    def plan(
        self, wanted: Sequence[Use], loss: Use | None, wrt: Sequence[Use], keep: bool
    ) -> Generator[Call, Any, tuple[list[Any], list[Any]]]:
        """The plan computing ``wanted``, keeping what live arrays still need."""
        live = self.liveness
        return plan(wanted, loss=loss, wrt=wrt, keep=keep, share=live.shared, adopt=live.adopt)

    def arguments(self, call: Call, kept: bool = True) -> dict[str, Any]:
        """``run``'s keyword arguments for ``call`` (``kept``: with its kept refs)."""
        arguments: dict[str, Any] = {
            "outputs": call.outputs,
            "loss": call.loss,
            "wrt": call.wrt or None,
            "keep": call.keep,
        }
        if kept and call.kept:
            arguments["kept"] = call.kept
        return arguments

    def check_sync(self, what: str) -> None:
        """TypeError if this is an AsyncClient's graph: ``what`` would block."""
        if self.is_async:
            raise TypeError(
                f"{what} would block on an AsyncClient's remote array: use `await array` "
                "(or `await tensorwire.arrays.compute_async(...)`)"
            )

    def check_async(self, what: str) -> None:
        """TypeError unless this is an AsyncClient's graph."""
        if not self.is_async:
            raise TypeError(f"{what} is for an AsyncClient's arrays; this one is a Client's")


def _finish(wanted: Sequence[Use], values: list[Any]) -> list[np.ndarray]:
    for use, value in zip(wanted, values, strict=True):
        use.node.values[use.index] = value
    return values


def run_sync(
    ctx: Context,
    wanted: Sequence[Use],
    *,
    loss: Use | None = None,
    wrt: Sequence[Use] = (),
    keep: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Compute ``wanted`` (and gradients) with a blocking Client; ``keep``: leave
    them on the server (``plan``)."""
    steps = ctx.plan(wanted, loss, wrt, keep)
    try:
        call = next(steps)
        while True:
            ctx.round_trips += 1
            try:
                result = ctx.client.run(call.program, call.inputs, **ctx.arguments(call))
            except ResourceExhaustedError:
                if not call.kept:
                    raise
                # Past the session's quota with the extra results: without them (the
                # call kept nothing); later values compute them again.
                ctx.round_trips += 1
                result = ctx.client.run(call.program, call.inputs, **ctx.arguments(call, False))
            call = steps.send(result)
    except StopIteration as done:
        values, grads = done.value
    if keep:
        ctx.liveness.release()
        return [], []
    fetched = []
    for value in values:
        if not isinstance(value, np.ndarray):  # a server-held source asked for as such
            ctx.round_trips += 1
            value = ctx.client.get(value)
        fetched.append(value)
    _finish(wanted, fetched)
    ctx.liveness.release()  # now that they are here, what only they needed can go
    return fetched, grads


async def run_async(
    ctx: Context,
    wanted: Sequence[Use],
    *,
    loss: Use | None = None,
    wrt: Sequence[Use] = (),
    keep: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Compute ``wanted`` (and gradients) with an AsyncClient."""
    steps = ctx.plan(wanted, loss, wrt, keep)
    try:
        call = next(steps)
        while True:
            ctx.round_trips += 1
            try:
                result = await ctx.client.run(call.program, call.inputs, **ctx.arguments(call))
            except ResourceExhaustedError:
                if not call.kept:
                    raise
                ctx.round_trips += 1  # as in run_sync
                arguments = ctx.arguments(call, False)
                result = await ctx.client.run(call.program, call.inputs, **arguments)
            call = steps.send(result)
    except StopIteration as done:
        values, grads = done.value
    if keep:
        ctx.liveness.release()
        return [], []
    fetched = []
    for value in values:
        if not isinstance(value, np.ndarray):
            ctx.round_trips += 1
            value = await ctx.client.get(value)
        fetched.append(value)
    _finish(wanted, fetched)
    ctx.liveness.release()  # now that they are here, what only they needed can go
    return fetched, grads
