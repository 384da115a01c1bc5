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
MAX_LINES = 500
#: The modules that only translate between the wire and the service core.
SERVICERS = ("tensorwire_server.v1.servicer", "tensorwire_server.kserve.servicer")
#: The most hand-written modules one folder of the server may hold.
MAX_MODULES = 12
#: The server's shared vocabulary: modules at its root that any package may import.
SHARED = ("settings", "limits", "named", "identities", "calls", "timeline", "eviction")
#: What each server package may import of the others (each package's docstring says
#: why); the shared modules above are allowed to all, and the root's other modules
#: (server, the composition root; cli; probe) to none.
LAYERS: dict[str, set[str]] = {
    "device": set(),
    "models": {"device"},
    "engine": {"models", "device"},
    "regions": {"device"},
    "core": {"engine", "models", "regions", "device"},
    "telemetry": set(),
    "transport": {"telemetry"},
    # The fast lane: its connections run the transport's gate and the v1 handlers the
    # root hands it, and know nothing of the protocols themselves.
    "lane": {"transport"},
    "dataport": {"regions"},
    "v1": {"core", "transport", "dataport", "lane", "engine", "models"},
    "kserve": {"core", "transport", "engine", "models", "regions", "device"},
    # The v2 protocol over HTTP/REST: kserve's protocol, codec and messages, behind
    # transport's gate; it answers nothing kserve does not.
    "rest": {"kserve", "transport"},
    # Deploying on Ray sits above the composition root: a replica is a whole server.
    "on_ray": set(),
}
#: Packages above the composition root, and the root modules each may import.
ABOVE_ROOT: dict[str, set[str]] = {
    "on_ray": {"tensorwire_server.server", "tensorwire_server.cli"},
}
#: What the root's entry points may import: server.py, the composition root, every
#: package; the command line only the server.
ROOT_IMPORTS = {
    "tensorwire_server.server": set(LAYERS),
    "tensorwire_server.cli": {"tensorwire_server.server"},
}


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
    assert {"tensorwire.client", "tensorwire.wire.codec", "tensorwire_server.engine.engine"} <= set(
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


def _package(module: str) -> str | None:
    """The server package ``module`` belongs to; None for the root's own modules."""
    parts = module.split(".")
    if parts[0] != "tensorwire_server" or len(parts) < 2:
        return None
    if len(parts) == 2 and parts[1] not in LAYERS:
        return None
    return parts[1]


def test_every_server_package_is_in_the_layers() -> None:
    folders = {p.name for p in (PACKAGES["tensorwire_server"] / "tensorwire_server").iterdir()}
    packages = {
        f
        for f in folders
        if (PACKAGES["tensorwire_server"] / "tensorwire_server" / f / "__init__.py").exists()
    }
    assert packages == set(LAYERS)
    for package in LAYERS:
        doc = ast.get_docstring(ast.parse(MODULES[f"tensorwire_server.{package}"].read_text()))
        assert doc and "May import" in doc, f"{package}/__init__.py says what it may import"


def test_each_server_package_imports_only_what_its_layer_allows() -> None:
    wrong = []
    for module, path in MODULES.items():
        package = _package(module)
        if not module.startswith("tensorwire_server") or module.endswith("__main__"):
            continue
        shared = {f"tensorwire_server.{m}" for m in SHARED}
        for name in _imported(module, path):
            if not name.startswith("tensorwire_server.") or name in shared:
                continue
            target = _package(name)
            if package is None and module.split(".")[-1] in SHARED:
                allowed = False  # the shared vocabulary imports only itself
            elif package is None:
                allowed = (target or name) in ROOT_IMPORTS.get(module, set())
            else:
                allowed = target == package or target in LAYERS[package]
                allowed = allowed or name in ABOVE_ROOT.get(package, set())
            if not allowed:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_only_the_composition_root_wires_the_protocols() -> None:
    protocols = {"v1", "kserve", "dataport"}
    wiring = {
        module
        for module, path in MODULES.items()
        if _package(module) is None and module.startswith("tensorwire_server")
        for name in _imported(module, path)
        if _package(name) in protocols
    }
    assert wiring == {"tensorwire_server.server"}


def test_no_server_folder_holds_too_many_modules() -> None:
    folders: dict[Path, int] = {}
    for module, path in MODULES.items():
        if module.startswith("tensorwire_server") and path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
    crowded = {str(f.relative_to(ROOT)): n for f, n in folders.items() if n > MAX_MODULES}
    assert not crowded, f"folders over {MAX_MODULES} modules: {crowded}"


def test_no_hand_written_module_is_too_long() -> None:
    sources = [
        *(p for p in MODULES.values()),
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
        *(ROOT / "examples").rglob("*.py"),
    ]
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


#: What the client's transport package may import of the client: the wire layer, the
#: contract, the errors, the types and the flows' vocabulary (Send, Route); never the
#: clients that hold it.
CLIENT_TRANSPORT = ("tensorwire._transport", *WIRE_LAYER, "tensorwire.types", "tensorwire._flow")


def test_the_client_transport_imports_nothing_of_the_clients_that_hold_it() -> None:
    wrong = [
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if module.split(".")[:2] == ["tensorwire", "_transport"]
        for name in _imported(module, path)
        if name.split(".")[0] == "tensorwire"
        and not any(name == a or name.startswith(f"{a}.") for a in CLIENT_TRANSPORT)
    ]
    assert not wrong, wrong
