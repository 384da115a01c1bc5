"""The shape of the code, checked: no import cycles, the server built on the client's
wire layer only, servicers that translate without torch, and no module too long to read.

Imports are read from the source (``ast``), every one of them: at module level, inside
functions and under ``if TYPE_CHECKING:`` alike, since a cycle there is still a cycle
for whoever reads the code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where each top-level package's source lives.
PACKAGES = {"tensorwire": ROOT / "client", "tensorwire_server": ROOT / "server"}
#: What the server may import of the client package: its wire layer, the generated
#: contract (whose path the proto package fixes) and the error tree.
WIRE_LAYER = ("tensorwire.wire", "tensorwire.v1", "tensorwire.errors")
#: The most lines a hand-written module may have.
MAX_LINES = 600
#: The modules that only translate between the wire and the service core.
SERVICERS = ("tensorwire_server.servicer", "tensorwire_server.kserve.servicer")


def _modules(generated: bool) -> dict[str, Path]:
    """Every module of the two packages by dotted name: the hand-written ones, or
    those scripts/gen-proto makes."""
    found = {}
    for package, root in PACKAGES.items():
        for path in (root / package).rglob("*.py"):
            if path.stem.endswith(("_pb2", "_pb2_grpc")) != generated:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules(generated=False)
#: Every module an import may name; the generated ones import nothing of ours.
NAMES = {*MODULES, *_modules(generated=True)}


def _imported(module: str, path: Path) -> Iterator[str]:
    """The dotted names ``module`` imports, anywhere in its source; ``from package
    import name`` names the submodule when ``name`` is one."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                yield name if name in NAMES else base


def _graph() -> dict[str, set[str]]:
    """Each project module's imports of project modules."""
    return {
        module: {name for name in _imported(module, path) if name in MODULES}
        for module, path in MODULES.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that
    imports itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_finds_the_project_and_its_imports() -> None:
    # A guard on the checks below: they are only as good as what they see.
    assert {"tensorwire.client", "tensorwire.wire.codec", "tensorwire_server.engine"} <= set(
        MODULES
    )
    graph = _graph()
    assert "tensorwire.wire.codec" in graph["tensorwire.client"] or any(
        "tensorwire.wire.codec" in graph[m] for m in graph["tensorwire.client"]
    )
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (TYPE_CHECKING imports included): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_server_uses_only_the_client_wire_layer() -> None:
    wrong = []
    for module, path in MODULES.items():
        if not module.startswith("tensorwire_server"):
            continue
        for name in _imported(module, path):
            if name != "tensorwire" and not name.startswith("tensorwire."):
                continue
            private = any(part.startswith("_") for part in name.split("."))
            allowed = any(name == w or name.startswith(f"{w}.") for w in WIRE_LAYER)
            if private or not allowed:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_the_client_never_imports_the_server_or_torch() -> None:
    wrong = [
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if module.startswith("tensorwire.") or module == "tensorwire"
        for name in _imported(module, path)
        if name.split(".")[0] in ("tensorwire_server", "torch")
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("servicer", SERVICERS)
def test_servicers_translate_without_torch(servicer: str) -> None:
    imported = set(_imported(servicer, MODULES[servicer]))
    assert not {n for n in imported if n == "torch" or n.startswith("torch.")}
    others = [s for s in SERVICERS if s != servicer]
    assert not imported & set(others), f"{servicer} imports another servicer"


def test_no_hand_written_module_is_too_long() -> None:
    sources = [
        *(p for p in MODULES.values()),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "examples").glob("*.py"),
    ]
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
