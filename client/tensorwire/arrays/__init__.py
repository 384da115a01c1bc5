"""Remote NumPy arrays: NumPy code that runs on the server's device unchanged.

``tensorwire.arrays.asarray(client, x)`` puts ``x`` on the server and returns a
RemoteArray. NumPy functions, ufuncs, operators, methods and basic indexing on it
build a graph on the client, with NumPy's result dtypes and shapes computed there;
nothing runs until a value is asked for (``np.asarray``, ``.numpy()``, ``float()``,
``bool()``, printing, ``await`` from an AsyncClient), and then the pending graph runs
as one program: one round trip per value asked for, intermediates never leave the
server. ``compute`` brings back several values in one round trip, ``grad`` a scalar's
gradient. Functions remote arrays do not implement raise UnsupportedError, naming
them; nothing is computed locally in their place.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

# NumPy 2's promotion rules (NEP 50: Python scalars are weak) are the semantics remote
# arrays reproduce, and what their dtypes are computed with; NumPy 1's value-based
# casting gives other dtypes for the same code. The rest of the client takes NumPy 1.24+.
if int(np.__version__.split(".")[0]) < 2:
    raise ImportError(
        f"tensorwire.arrays needs NumPy 2 or newer (NEP 50 promotion); NumPy {np.__version__} "
        "is installed. The rest of tensorwire works with it."
    )

from tensorwire.arrays import functions, linalg_fft, namespace, reductions, ufuncs
from tensorwire.arrays.array import RemoteArray, dtype_name
from tensorwire.arrays.dispatch import UnsupportedError, supported, supported_markdown
from tensorwire.arrays.execute import Context, run_async, run_sync
from tensorwire.arrays.graph import Node, Use
from tensorwire.arrays.linalg_fft import SVDResult

_ = (functions, linalg_fft, namespace, reductions, ufuncs)  # imported to fill the dispatch tables
_CONTEXTS: weakref.WeakKeyDictionary[Any, Context] = weakref.WeakKeyDictionary()


def _context(client: Any) -> Context:
    """The one Context per client, so that arrays from one client combine."""
    ctx = _CONTEXTS.get(client)
    if ctx is None:
        ctx = _CONTEXTS[client] = Context(client)
    return ctx


def asarray(source: Any, data: Any = None) -> RemoteArray:
    """A remote array: ``asarray(client, x)`` puts ``x`` on the server now (one round
    trip, with a blocking Client); ``asarray(tensor)`` wraps a tensor the server already
    holds (a RemoteTensor, e.g. ``await async_client.put(x)``)."""
    handle = getattr(source, "handle", None)
    if data is None and handle is not None:
        client = source._client
        return RemoteArray(_context(client), Use(Node(tensor=source)), source.dtype, source.shape)
    if data is None:
        raise TypeError("asarray(client, data) or asarray(remote_tensor)")
    ctx = _context(source)
    if ctx.is_async:
        raise TypeError("asarray(client, data) would block: `await asarray_async(client, data)`")
    if isinstance(data, RemoteArray):
        return data
    arr = np.asarray(data)
    dtype_name(arr.dtype)
    ctx.round_trips += 1
    tensor = source.put(arr)
    return RemoteArray(ctx, Use(Node(tensor=tensor)), arr.dtype, arr.shape)


async def asarray_async(client: Any, data: Any) -> RemoteArray:
    """``asarray(client, data)`` for an AsyncClient: ``await`` the upload."""
    ctx = _context(client)
    ctx.check_async("asarray_async(client, data)")
    arr = np.asarray(data)
    dtype_name(arr.dtype)
    ctx.round_trips += 1
    tensor = await client.put(arr)
    return RemoteArray(ctx, Use(Node(tensor=tensor)), arr.dtype, arr.shape)


def constant(client: Any, data: Any) -> RemoteArray:
    """A remote array of local data that travels inside each program that uses it
    (no round trip of its own: for small arrays, and from an AsyncClient)."""
    arr = np.asarray(data)
    dtype_name(arr.dtype)
    return RemoteArray(_context(client), Use(Node(data=arr)), arr.dtype, arr.shape)


def _uses(arrays: Sequence[RemoteArray], what: str) -> tuple[Context, list[Use]]:
    if not arrays or not all(isinstance(a, RemoteArray) for a in arrays):
        raise TypeError(f"{what} takes remote arrays")
    contexts = {id(a._ctx) for a in arrays}
    if len(contexts) > 1:
        raise ValueError(f"{what}: the arrays belong to different clients")
    return arrays[0]._ctx, [a._use for a in arrays]


def compute(*arrays: RemoteArray) -> tuple[np.ndarray, ...]:
    """The values of ``arrays``, computed together in one program (one round trip)."""
    ctx, uses = _uses(arrays, "compute")
    ctx.check_sync("compute()")
    values, _ = run_sync(ctx, uses)
    return tuple(values)


async def compute_async(*arrays: RemoteArray) -> tuple[np.ndarray, ...]:
    """``compute`` for an AsyncClient's arrays."""
    ctx, uses = _uses(arrays, "compute_async")
    ctx.check_async("compute_async()")
    values, _ = await run_async(ctx, uses)
    return tuple(values)


def persist(*arrays: RemoteArray) -> None:
    """Compute ``arrays`` in one program and keep them on the server: later values
    that need them start from them instead of computing them again. Nothing comes
    back (one round trip)."""
    ctx, uses = _uses(arrays, "persist")
    ctx.check_sync("persist()")
    run_sync(ctx, uses, keep=True)


async def persist_async(*arrays: RemoteArray) -> None:
    """``persist`` for an AsyncClient's arrays."""
    ctx, uses = _uses(arrays, "persist_async")
    ctx.check_async("persist_async()")
    await run_async(ctx, uses, keep=True)


def _grad_uses(loss: RemoteArray, wrt: Sequence[RemoteArray]) -> tuple[Context, Use, list[Use]]:
    ctx, uses = _uses([loss, *wrt], "grad")
    if loss.size != 1 or loss.dtype.kind not in "fc":
        raise ValueError(f"grad: the loss must be a floating point scalar, not {loss.describe()}")
    if not loss._use.node.function:
        raise ValueError("grad: the loss must be computed from the arrays in wrt")
    for array in wrt:
        if array._use.node.function:
            raise ValueError(
                "grad: wrt takes arrays held on the server or given as data "
                f"(asarray, constant), not computed ones like {array.describe()}"
            )
    return ctx, uses[0], uses[1:]


def grad(loss: RemoteArray, *wrt: RemoteArray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The value of the scalar ``loss`` and its gradients with respect to ``wrt``
    (remote arrays from ``asarray`` or ``constant``), from one program."""
    ctx, use, wrt_uses = _grad_uses(loss, wrt)
    ctx.check_sync("grad()")
    (value,), grads = run_sync(ctx, [use], loss=use, wrt=wrt_uses)
    return value, tuple(grads)


async def grad_async(
    loss: RemoteArray, *wrt: RemoteArray
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """``grad`` for an AsyncClient's arrays."""
    ctx, use, wrt_uses = _grad_uses(loss, wrt)
    ctx.check_async("grad_async()")
    (value,), grads = await run_async(ctx, [use], loss=use, wrt=wrt_uses)
    return value, tuple(grads)


def round_trips(client: Any) -> int:
    """Round trips remote arrays of ``client`` have made (puts, programs, gets)."""
    return _context(client).round_trips


__all__ = [
    "RemoteArray",
    "SVDResult",
    "UnsupportedError",
    "asarray",
    "asarray_async",
    "compute",
    "compute_async",
    "constant",
    "grad",
    "grad_async",
    "persist",
    "persist_async",
    "round_trips",
    "supported",
    "supported_markdown",
]
