"""Layering of the detres package (docs/architecture.md): a lower floor never imports a higher one.

Every module under detres/ is parsed with ``ast``; each import of ``detres.<pkg>`` (absolute or
relative, at module level or inside a function) is mapped to the floor of ``<pkg>``. Imports within
one floor (e.g. models <-> evaluation) and downwards are allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "detres"

# docs/architecture.md: floor 6 is tools/ and benchmarks/, outside the package.
FLOORS: dict[str, int] = {
    "structures": 1,
    "config": 1,
    "utils": 1,
    "data": 2,
    "models": 3,
    "evaluation": 3,
    "inference": 4,
    "engine": 5,
}


def _module_parts(path: Path, root: Path) -> list[str]:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(node: ast.AST, module: list[str], is_package: bool) -> list[list[str]]:
    """Dotted names (as lists) that one Import/ImportFrom node brings in, relative ones resolved."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".") for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module if is_package else module[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = base + (node.module.split(".") if node.module else [])
    else:
        target = node.module.split(".")
    # ``from detres import data`` imports the subpackage: name it by what is imported.
    return [target + [alias.name] for alias in node.names] if len(target) == 1 else [target]


def upward_imports(root: Path = PACKAGE_ROOT, floors: dict[str, int] = FLOORS) -> list[str]:
    """``file:line: <importer> (floor a) imports <module> (floor b)`` for every import that points up."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_parts(path, root)
        if len(module) < 2:  # detres/__init__.py itself sits above every floor
            continue
        here = module[1]
        if here not in floors:
            problems.append(f"{path}: package {here!r} has no floor in docs/architecture.md (add it to FLOORS)")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported_modules(node, module, path.name == "__init__.py"):
                if len(target) < 2 or target[0] != root.name:
                    continue
                there = target[1]
                if there not in floors:
                    problems.append(f"{path}:{node.lineno}: imports {'.'.join(target)}, a package with no floor")
                elif floors[there] > floors[here]:
                    problems.append(
                        f"{path.relative_to(root.parent)}:{node.lineno}: {here} (floor {floors[here]}) imports "
                        f"{'.'.join(target)} (floor {floors[there]})"
                    )
    return problems


def test_no_lower_floor_imports_a_higher_one():
    problems = upward_imports()
    assert not problems, "imports pointing up the floors of docs/architecture.md:\n" + "\n".join(problems)


def test_every_package_has_a_floor():
    packages = {p.name for p in PACKAGE_ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(FLOORS), f"packages without a floor: {sorted(packages - set(FLOORS))}"


@pytest.mark.parametrize(
    ("source", "relpath"),
    [
        ("from detres.engine.x import y\n", "models/a.py"),
        ("import detres.engine.x\n", "models/a.py"),
        ("from detres import engine\n", "models/a.py"),
        ("def f():\n    from detres.engine import x\n", "models/a.py"),  # lazy imports count too
        ("from ..engine import x\n", "models/a.py"),
        ("from ...engine import x\n", "models/sub/a.py"),
        ("from ...engine import x\n", "models/sub/__init__.py"),  # an __init__ is its own package
    ],
)
def test_the_checker_finds_upward_imports(tmp_path, source, relpath):
    root = tmp_path / "detres"
    for rel in ("__init__.py", "models/__init__.py", "models/sub/__init__.py", "engine/__init__.py", "engine/x.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    (root / relpath).write_text(source)
    problems = upward_imports(root)
    assert len(problems) == 1 and "models (floor 3) imports detres.engine" in problems[0], problems
    assert f"{Path('detres', relpath)}:" in problems[0]


def test_the_checker_allows_downward_and_same_floor_imports(tmp_path):
    root = tmp_path / "detres"
    for rel in ("__init__.py", "models/__init__.py", "evaluation/__init__.py", "engine/__init__.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    (root / "engine" / "a.py").write_text("from detres.models import b\nfrom ..utils.atomic import c\n")
    (root / "evaluation" / "a.py").write_text("import detres.models.b\nfrom . import voc\nimport numpy\n")
    assert upward_imports(root) == []


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (module level or inside functions), package modules only."""
    modules = {".".join(_module_parts(path, root)): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        parts = name.split(".")
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolved_from(node, parts, path.name == "__init__.py")
                # ``from pkg import mod`` imports the module pkg.mod when there is one, else names of pkg
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def _resolved_from(node: ast.ImportFrom, module: list[str], is_package: bool) -> str:
    """The absolute dotted module of ``from <module> import ...`` (relative forms resolved)."""
    if not node.level:
        return node.module or ""
    base = module if is_package else module[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + (node.module.split(".") if node.module else []))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert not circles, "modules importing each other (directly or through others):\n" + "\n".join(
        " <-> ".join(group) for group in circles
    )


def test_the_circle_finder_finds_a_lazy_circle(tmp_path):
    root = tmp_path / "detres"
    (root / "engine").mkdir(parents=True)
    for rel, text in {
        "__init__.py": "",
        "engine/__init__.py": "",
        "engine/a.py": "from detres.engine.b import f\n",
        "engine/b.py": "def f():\n    from detres.engine import c\n",
        "engine/c.py": "import detres.engine.a\n",
        "engine/d.py": "from detres.engine.a import g\n",
    }.items():
        (root / rel).write_text(text)
    assert import_circles(import_graph(root)) == [["detres.engine.a", "detres.engine.b", "detres.engine.c"]]


MAX_LINES = 400


def test_no_library_file_over_max_lines():
    long = {
        str(path.relative_to(PACKAGE_ROOT.parent)): n
        for path in PACKAGE_ROOT.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by concept): {long}"
