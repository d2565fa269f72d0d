"""The package's shape, held against the code: layers, no cycles, the library at the root.

The layers, bottom up: core (commit, errors, settings, payloads, headers, metrics, diff,
merge) <- storage/
<- zk/ <- web/ <- process (wsgi, gunicorn_*). client, cli, render and transfer sit on core (and
transfer on the storage protocol). Flask lives under web/ only, kazoo under zk/ only, peewee
under storage/ only.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import rainer_server

PACKAGE = Path(rainer_server.__file__).parent

# Every public name the layout issue lists, importable from the package root.
LIBRARY = [
    "Commit",
    "CommitNotFound",
    "CommitOrderingError",
    "CommitTooLarge",
    "ConcurrentCommitError",
    "ConfigurationError",
    "InvalidCommit",
    "KeeperError",
    "PayloadRejected",
    "RainerError",
    "StorageUnavailable",
    "CommitStorage",
    "MemoryCommitStorage",
    "DbCommitStorage",
    "open_database",
    "with_pre_save_hook",
    "with_post_save_hook",
    "CommitKeeper",
    "CommitMirror",
    "keeper_publishing",
    "AutoPublisher",
    "Rainers",
    "RainerClient",
    "HttpCommitStorage",
    "Rainer",
    "create_app",
]

# Which layer each module belongs to, and which layers it may import.
LAYER_OF = {
    "commit": "core",
    "errors": "core",
    "settings": "core",
    "payloads": "core",
    "headers": "core",
    "metrics": "core",
    "access": "core",
    "audit": "core",
    "chain": "core",
    "diff": "core",
    "merge": "core",
    "version": "core",
    "storage": "storage",
    "transfer": "transfer",
    "zk": "zk",
    "web": "web",
    "client": "client",
    "cli": "client",
    "render": "client",
    "wsgi": "process",
    "gunicorn_conf": "process",
    "gunicorn_hooks": "process",
    "gunicorn_logging": "process",
}
MAY_IMPORT = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "transfer": {"core", "storage"},
    "zk": {"core", "storage", "zk"},
    "web": {"core", "storage", "transfer", "zk", "web", "client"},
    "client": {"core", "client"},
    "process": {"core", "storage", "zk", "web", "process"},
}
# Third-party stacks and the only layer allowed to import each.
FRAMEWORK_HOME = {
    "flask": "web",
    "werkzeug": "web",
    "kazoo": "zk",
    "peewee": "storage",
    "playhouse": "storage",
    "pymysql": "storage",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(("rainer_server", *parts))] = path
    return modules


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``, TYPE_CHECKING too."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, top))
                for alias in child.names:  # `from rainer_server.web import admin`
                    found.append((f"{child.module}.{alias.name}", top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(tree, True)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 and parts[0] == "rainer_server" else None


def test_every_library_name_imports_from_the_package_root():
    code = "".join(f"from rainer_server import {name}\n" for name in LIBRARY)
    code += "import rainer_server\nassert all(hasattr(rainer_server, n) for n in rainer_server.__all__)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert set(LIBRARY) <= set(rainer_server.__all__)
    assert rainer_server.__version__ == importlib.metadata.version("rainer_server")


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        rainer_server.NoSuchThing  # noqa: B018


def test_importing_the_package_loads_no_framework():
    code = (
        "import sys, rainer_server\n"
        "print(sorted(m for m in ('flask', 'werkzeug', 'peewee', 'pymysql', 'kazoo')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_imports_point_down_the_layers_and_frameworks_stay_home():
    wrong = []
    for module, path in _modules().items():
        layer = _layer(module)
        if layer is None:  # the lazy facade (rainer_server/__init__.py) names every layer
            continue
        for imported, _top in _imports(path):
            target = _layer(imported)
            if target is not None and target not in MAY_IMPORT[layer]:
                wrong.append(f"{module} ({layer}) imports {imported} ({target})")
            home = FRAMEWORK_HOME.get(imported.split(".")[0])
            if home is not None and layer != home:
                wrong.append(f"{module} ({layer}) imports {imported}, which belongs in {home}/")
    assert wrong == []


def test_no_module_reads_names_from_the_facade():
    # The package root names every layer (lazily): a module taking a name from it would
    # depend, as far as any reader of the imports can tell, on the layers above it.
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        if module == "rainer_server":
            continue
        for imported, _top in _imports(path):
            parent, _, name = imported.rpartition(".")
            if parent == "rainer_server" and imported not in modules:
                wrong.append(f"{module} imports {name} from the package root")
    assert wrong == []


def test_no_import_cycles_and_no_imports_hidden_in_functions():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    hidden = []
    for module, path in modules.items():
        if module == "rainer_server":
            continue
        edges = set()
        for imported, top in _imports(path):
            if imported in modules and imported not in (module, "rainer_server"):
                edges.add(imported)
                if not top:
                    hidden.append(f"{module} imports {imported} inside a function")
        graph[module] = edges
    assert hidden == []

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == []


def test_rainer_version():
    out = subprocess.run(
        [sys.executable, "-m", "rainer_server.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"rainer {rainer_server.__version__}"
