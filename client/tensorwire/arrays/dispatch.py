"""The dispatch tables NumPy's protocols look in: which NumPy functions and ufuncs a
remote array implements, filled by the modules that implement them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final


class UnsupportedError(TypeError):
    """A NumPy function or argument remote arrays do not implement. Nothing is computed
    locally in its place: ``np.asarray(x)`` brings an array back if that is wanted."""


#: NumPy function -> implementation on remote arrays (``__array_function__``).
FUNCTIONS: Final[dict[Callable[..., Any], Callable[..., Any]]] = {}
#: NumPy ufunc -> (torch function on the allowlist, extra keyword arguments).
UFUNCS: Final[dict[Any, tuple[str, dict[str, Any]]]] = {}
#: ufunc -> implementation of its ``reduce`` method.
REDUCES: Final[dict[Any, Callable[..., Any]]] = {}
#: What the array type calls without importing its implementers (no import cycle):
#: "ufunc" -> the ufunc caller; "namespace" -> the array API namespace module.
HOOKS: Final[dict[str, Any]] = {}
#: Public names of the NumPy functions this package implements, as ``numpy.linalg.svd``.
METHODS: Final[list[str]] = []


def implements(*functions: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated function as the implementation of NumPy ``functions``."""

    def register(impl: Callable[..., Any]) -> Callable[..., Any]:
        for function in functions:
            FUNCTIONS[function] = impl
        return impl

    return register


def public_name(function: Any) -> str:
    """``numpy.linalg.svd`` for np.linalg.svd, ``numpy.add`` for np.add."""
    module = getattr(function, "__module__", None) or "numpy"
    module = module.replace("numpy._core.", "numpy.").replace("numpy.core.", "numpy.")
    for private in (".fromnumeric", ".multiarray", ".numeric", ".umath", ".shape_base"):
        module = module.replace(private, "")
    module = module.replace("numpy.linalg._linalg", "numpy.linalg").replace(
        "numpy.fft._pocketfft", "numpy.fft"
    )
    if module.startswith("numpy.lib") or module == "numpy._core":
        module = "numpy"
    return f"{module}.{function.__name__}"


def supported() -> list[str]:
    """Every NumPy function, ufunc and array method remote arrays implement, sorted."""
    names = {public_name(f) for f in FUNCTIONS}
    names |= {f"numpy.{u.__name__}" for u in UFUNCS}
    names |= {f"numpy.{u.__name__}.reduce" for u in REDUCES}
    names |= {f"RemoteArray.{m}" for m in METHODS}
    return sorted(names)


def supported_markdown() -> str:
    """``supported()`` as the README lists it: one bullet per kind of name."""
    names = supported()
    ufuncs = {f"numpy.{u.__name__}" for u in UFUNCS}
    groups: dict[str, list[str]] = {
        "ufuncs (and operators)": [n for n in names if n in ufuncs],
        "ufunc methods": [n for n in names if n.endswith(".reduce")],
        "functions": [
            n
            for n in names
            if n.startswith("numpy.")
            and n not in ufuncs
            and not n.endswith(".reduce")
            and n.count(".") == 1
        ],
        "numpy.linalg": [n for n in names if n.startswith("numpy.linalg.")],
        "numpy.fft": [n for n in names if n.startswith("numpy.fft.")],
        "RemoteArray methods and attributes": [n for n in names if n.startswith("RemoteArray.")],
    }
    lines = []
    for title, members in groups.items():
        short = [m.removeprefix("numpy.").removeprefix("RemoteArray.") for m in members]
        lines.append(f"- {title}: " + ", ".join(f"`{s}`" for s in short))
    return "\n".join(lines)
