"""The package's shape: its public names, module docstrings, and which layer may import which."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import zmesh

PACKAGE = Path(zmesh.__file__).resolve().parent
MODULE_FILES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def zmesh_imports(path: Path) -> set[str]:
    """Every zmesh module ``path`` imports, anywhere in it (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names if is_module(f"{module}.{alias.name}")]
            # ``from zmesh import api`` imports the module zmesh.api; ``from zmesh import get`` uses the package itself.
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(module)
    return {name for name in found if name == "zmesh" or name.startswith("zmesh.")}


def is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def modules_under(subpackage: str) -> list[Path]:
    return [p for p in MODULE_FILES if p.relative_to(PACKAGE).parts[0] == subpackage]


def test_there_are_modules_to_check() -> None:
    names = {module_name(p) for p in MODULE_FILES}
    assert {"zmesh", "zmesh.api", "zmesh.transport.protocol", "zmesh.runtime.core", "zmesh.node.daemon"} <= names
    assert modules_under("transport") and modules_under("runtime") and modules_under("node")


def test_all_is_sorted_and_every_name_exists() -> None:
    assert zmesh.__all__ == sorted(zmesh.__all__)
    assert len(set(zmesh.__all__)) == len(zmesh.__all__)
    missing = [name for name in zmesh.__all__ if not hasattr(zmesh, name)]
    assert not missing, missing


def test_exceptions_all_is_sorted_and_complete() -> None:
    from zmesh import exceptions

    assert exceptions.__all__ == sorted(exceptions.__all__)
    public = {
        name
        for name, value in vars(exceptions).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == exceptions.__name__
    }
    assert public - {n for n in public if n.startswith("_")} == set(exceptions.__all__)


@pytest.mark.parametrize("path", MODULE_FILES, ids=[module_name(p) for p in MODULE_FILES])
def test_every_module_has_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and docstring.strip(), f"{module_name(path)} has no module docstring"


IMPORTABLE = [p for p in MODULE_FILES if module_name(p) != "zmesh.__main__"]  # importing that one runs the CLI


@pytest.mark.parametrize("path", IMPORTABLE, ids=[module_name(p) for p in IMPORTABLE])
def test_every_module_imports(path: Path) -> None:
    importlib.import_module(module_name(path))


TRANSPORT_MAY_IMPORT = ("zmesh.transport", "zmesh.exceptions", "zmesh.options")


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules_under("transport"), ids=[module_name(p) for p in modules_under("transport")])
def test_transport_imports_only_transport_and_leaf_helpers(path: Path) -> None:
    bad = sorted(name for name in zmesh_imports(path) if not allowed(name, TRANSPORT_MAY_IMPORT))
    assert not bad, f"{module_name(path)} imports {bad}; transport may import only {TRANSPORT_MAY_IMPORT}"


RUNTIME_MUST_NOT_IMPORT = ("zmesh.api", "zmesh.actor", "zmesh.cli", "zmesh.node")
NODE_MUST_NOT_IMPORT = ("zmesh.api", "zmesh.actor", "zmesh.cli")


@pytest.mark.parametrize("path", modules_under("runtime"), ids=[module_name(p) for p in modules_under("runtime")])
def test_runtime_never_imports_api_actor_cli_or_node(path: Path) -> None:
    bad = sorted(name for name in zmesh_imports(path) if name == "zmesh" or allowed(name, RUNTIME_MUST_NOT_IMPORT))
    assert not bad, f"{module_name(path)} imports {bad}"


@pytest.mark.parametrize("path", modules_under("node"), ids=[module_name(p) for p in modules_under("node")])
def test_node_never_imports_api_actor_or_cli(path: Path) -> None:
    bad = sorted(name for name in zmesh_imports(path) if name == "zmesh" or allowed(name, NODE_MUST_NOT_IMPORT))
    assert not bad, f"{module_name(path)} imports {bad}"


def test_import_scan_sees_what_it_should() -> None:
    """The scan itself: it must find absolute, ``from zmesh import x`` and function-level imports."""
    assert "zmesh.transport.serialization" in zmesh_imports(PACKAGE / "transport" / "protocol.py")
    assert "zmesh.runtime" in zmesh_imports(PACKAGE / "worker" / "main.py")
    assert "zmesh.worker.main" in zmesh_imports(PACKAGE / "node" / "pool" / "zygote.py")  # imported inside a function
    assert "zmesh.api" in zmesh_imports(PACKAGE / "actor.py")  # ``from zmesh import api`` inside a function
    assert "zmesh" not in zmesh_imports(PACKAGE / "actor.py")  # only submodules of the package
    assert "zmesh.runtime.core" in zmesh_imports(PACKAGE / "runtime" / "__init__.py")


FORBIDDEN_IN_CORE = ("zmq", "socket", "os", "threading", "time", "select", "asyncio", "subprocess", "psutil")
CORE_MAY_IMPORT = ("zmesh.node.core", "zmesh.transport.ids")


def all_imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, zmesh's included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


CORE = [p for p in MODULE_FILES if p.relative_to(PACKAGE).parts[:2] == ("node", "core")]


@pytest.mark.parametrize("path", CORE, ids=[module_name(p) for p in CORE])
def test_node_core_is_pure(path: Path) -> None:
    """The node's decisions take events and ``now`` and return actions: no sockets, threads, clock or OS."""
    io = sorted(all_imports(path) & set(FORBIDDEN_IN_CORE))
    assert not io, f"{module_name(path)} imports {io}; the pure cores may not"
    bad = sorted(name for name in zmesh_imports(path) if not allowed(name, CORE_MAY_IMPORT))
    assert not bad, f"{module_name(path)} imports {bad}; the pure cores may import only {CORE_MAY_IMPORT}"


def test_there_are_pure_cores() -> None:
    names = {module_name(p) for p in CORE}
    assert {"zmesh.node.core.membership", "zmesh.node.core.gossip", "zmesh.node.core.registry", "zmesh.node.core.scheduler"} <= names


NODE = [p for p in MODULE_FILES if p.relative_to(PACKAGE).parts[0] == "node"]


@pytest.mark.parametrize("path", MODULE_FILES, ids=[module_name(p) for p in MODULE_FILES])
def test_modules_stay_small(path: Path) -> None:
    """One job per module: none of zmesh's over 500 lines."""
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{module_name(path)} has {lines} lines; split it by job"


@pytest.mark.parametrize("path", NODE, ids=[module_name(p) for p in NODE])
def test_node_has_no_mixins(path: Path) -> None:
    """Components get their dependencies in their constructor: a node class derives from nothing but errors and protocols."""
    allowed_bases = {"Exception", "Protocol", "ValueError", "RuntimeError"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = {b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases}
            assert bases <= allowed_bases or any(b.endswith("Error") for b in bases), (
                f"{module_name(path)}.{node.name} derives from {bases}"
            )
