"""The layout rule (docs: architecture.md): dependencies point one way. Nothing in ``runtime`` imports
``client``; ``client`` takes from ``runtime`` only the wire schema (``runtime.wire``). Every module
of both packages is parsed (``ast``), so a new module is checked without being listed here."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIRE = "runtime.wire"
DYNAMIC = {"import_module", "__import__", "files", "find_spec"}  # importlib / importlib.resources


def modules(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, f"no modules under {package}/"
    return found


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for each thing ``path`` imports: ``import a.b`` gives ``a.b``,
    ``from a import b`` gives ``a.b`` (b may be a module), relative imports resolved against the
    module's package; a constant string passed to ``importlib.import_module``, ``__import__``,
    ``importlib.resources.files`` or ``find_spec`` counts too (that is reaching in as well)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                assert base, f"{path}:{node.lineno}: relative import above the top-level package"
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                yield node.lineno, source if alias.name == "*" else f"{source}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if called in DYNAMIC and isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offences(package: str, allowed) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in modules(package)
        for line, module in imports(path)
        if not allowed(module)
    ]


def test_runtime_never_imports_client() -> None:
    assert offences("runtime", lambda module: not within(module, "client")) == []


def test_client_takes_only_the_wire_schema_from_runtime() -> None:
    assert offences("client", lambda module: not within(module, "runtime") or within(module, WIRE)) == []


@pytest.mark.parametrize(
    ("source", "where", "expected"),
    [
        ("import client.chat", "runtime/cli.py", ["client.chat"]),
        ("from client import chat", "runtime/cli.py", ["client.chat"]),
        ("from .. import wire", "runtime/server/app.py", ["runtime.wire"]),
        ("from .remote import connect", "client/chat.py", ["client.remote.connect"]),
        ("from . import remote", "client/__init__.py", ["client.remote"]),
        ("from runtime.wire import *", "client/remote.py", ["runtime.wire"]),
        ("resources.files('client')", "runtime/server/app.py", ["client"]),
        ("importlib.import_module('client.chat')", "runtime/cli.py", ["client.chat"]),
        ("print('client')", "runtime/cli.py", []),
    ],
)
def test_the_import_reader(tmp_path: Path, source: str, where: str, expected: list[str]) -> None:
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source + "\n")
    assert [module for _, module in imports(path, tmp_path)] == expected


def test_the_served_page_is_package_data_of_the_server() -> None:
    from runtime.server.app import WEB_ROOT

    assert {p.name for p in WEB_ROOT.iterdir()} >= {"index.html", "app.js", "style.css"}
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = WEB_ROOT.relative_to(ROOT / "runtime").as_posix()
    assert f"{relative}/*" in data["runtime"]
    assert not (ROOT / "client" / "web").exists()
