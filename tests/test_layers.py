"""Shoal's shape: one import package, layers without cycles, a torch-free daemon, a self-contained tree.

The layers, bottom to top (docs/design.md): `shoal.errors`; `shoal.kernels` and `shoal.transport`;
`shoal.dht`; `shoal.gossip`; `shoal.peer`. A layer imports only the layers below it that the table
`ALLOWED` names, and nothing outside `shoal.peer` imports `shoal.peer`. Imports are read with `ast` from
every module's source (at the top, inside functions, under `if TYPE_CHECKING:` alike), so a cycle or a
wrong-way import fails here even when no test happens to execute that line.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER_FOLDERS = ("kernels", "transport", "dht", "gossip", "peer")

# What each layer may import besides itself. `shoal` (the package's __init__) is below everything too.
ALLOWED: dict[str, set[str]] = {
    "shoal": set(),
    "errors": set(),
    "kernels": {"errors"},
    "transport": {"errors"},
    "dht": {"transport", "errors"},
    "gossip": {"dht", "transport", "kernels", "errors"},
    "peer": {"gossip", "dht", "transport", "kernels", "errors"},
}


def module_files() -> dict[str, Path]:
    """Every Shoal module name -> its source file (the layer folders, read directly, and shoal/*.py)."""
    modules = {}
    sources = [(path, ("shoal", *path.relative_to(REPO).with_suffix("").parts)) for path in _layer_sources()]
    sources += [(path, ("shoal", path.stem)) for path in sorted((REPO / "shoal").glob("*.py"))]
    for path, parts in sources:
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _layer_sources() -> list[Path]:
    files = []
    for folder in LAYER_FOLDERS:
        files += [p for p in sorted((REPO / folder).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def imported_names(module: str, path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import statement of one module, relative ones resolved.

    `from X import y` names `X.y` when that is a module of its own, else `X`.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                if not is_package:
                    package = package[:-1]
                base = package[: len(package) - (node.level - 1)]
                assert base, f"{path}:{node.lineno}: a relative import climbs above the shoal package"
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.append((submodule if submodule in modules else source, node.lineno))
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    """Edges between Shoal's modules, and each module's imports of `shoal...` names with their places."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    shoal_imports: dict[str, list[tuple[str, str]]] = {name: [] for name in modules}
    for name, path in modules.items():
        for target, line in imported_names(name, path, set(modules)):
            if target != "shoal" and not target.startswith("shoal."):
                continue
            shoal_imports[name].append((target, f"{path.relative_to(REPO)}:{line}"))
            if target in modules and target != name:
                graph[name].add(target)
    return graph, shoal_imports


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "shoal", module
    return parts[1] if len(parts) > 1 else "shoal"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Breadth-first from start back to start inside the component: the shortest cycle through it.
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node] & members):
                    if nxt == start:
                        cycle = [*paths[node], start]
                        break
                    if nxt not in paths:
                        paths[nxt] = [*paths[node], nxt]
                        following.append(nxt)
                if cycle:
                    break
            frontier = following
        cycles.append(cycle or component)
    return cycles


def test_every_layer_module_is_scanned():
    modules = module_files()
    assert {"shoal", "shoal.errors", "shoal.kernels.codec", "shoal.peer.daemon", "shoal.peer.cli"} <= set(
        modules
    ), sorted(modules)
    graph, _ = import_graph()
    assert "shoal.peer.commands" in graph["shoal.peer.daemon"], "the scanner misses plain absolute imports"
    assert any(target.startswith("shoal.transport.") for target in graph["shoal.transport.host"]), (
        "the scanner misses relative imports"
    )


def test_no_import_cycle_among_shoal_modules():
    graph, _ = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (each line: one cycle, an arrow is an import):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_imports_respect_the_layer_order():
    _, shoal_imports = import_graph()
    wrong = []
    for module, targets in sorted(shoal_imports.items()):
        layer = layer_of(module)
        for target, place in targets:
            other = layer_of(target)
            if other in (layer, "shoal"):
                continue
            if other == "peer":
                wrong.append(f"{place}: {module} imports {target} (nothing outside shoal.peer imports it)")
            elif other not in ALLOWED[layer]:
                allowed = ", ".join(sorted(ALLOWED[layer])) or "no other layer"
                wrong.append(f"{place}: {module} imports {target} (shoal.{layer} may import {allowed})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_module_imports_a_layer_by_its_bare_folder_name():
    """`import kernels` would find Hugging Face's `kernels` once installed; Shoal's is `shoal.kernels`."""
    bare = []
    for path in _tracked_files():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            bare += [
                f"{path.relative_to(REPO)}:{node.lineno}: {name}"
                for name in names
                if name.split(".")[0] in LAYER_FOLDERS
            ]
    assert not bare, "imports of a layer without the shoal. prefix:\n" + "\n".join(bare)


def test_the_daemon_imports_no_torch():
    code = (
        "import shoal.peer.daemon, shoal.peer.cli, sys; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:5])"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]", f"the daemon process imported torch: {result.stdout.strip()}"


# Citations of files that live outside this repository (a sibling folder, private notes). Built so that
# this file does not match its own patterns.
OUTSIDE_CITATIONS = re.compile(r"\.\./shared\b|\bresearch-[A-Za-z0-9_.-]+\.md\b|\bresearch\s+notes\b", re.I)


def _tracked_files() -> list[Path]:
    """The repository's files: tracked, and new ones that are not ignored (regular files only)."""
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    names = sorted({name for name in result.stdout.decode().split("\0") if name})
    paths = [REPO / name for name in names]
    return [p for p in paths if p.is_file() and not p.is_symlink()]


def test_no_file_cites_a_path_outside_the_repository():
    found = []
    for path in _tracked_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if match := OUTSIDE_CITATIONS.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r}: {line.strip()[:120]}")
    assert not found, (
        f"{len(found)} lines cite files that are not in this repository "
        "(say it here, or point into docs/):\n" + "\n".join(found)
    )


def _package_find() -> dict:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return pyproject.get("tool", {}).get("setuptools", {})


def test_pyproject_installs_only_the_shoal_package():
    setuptools_table = _package_find()
    for key in ("packages", "py-modules", "package-dir"):
        if key == "packages" and isinstance(setuptools_table.get(key), dict):
            continue  # the `find` table, checked below
        assert key not in setuptools_table, f"[tool.setuptools] {key} adds packages besides the find table"
    find = setuptools_table.get("packages", {}).get("find")
    assert find is not None, "pyproject.toml has no [tool.setuptools.packages.find]"
    include = find.get("include")
    assert include, "[tool.setuptools.packages.find] has no include list: it would install every folder"
    for pattern in include:
        assert pattern in ("shoal", "shoal.*"), f"include pattern {pattern!r} is not shoal or shoal.*"
        for other in ("kernels", "transport", "dht", "gossip", "peer", "natlab", "bench", "tests", "docs"):
            assert not fnmatch.fnmatchcase(other, pattern), (pattern, other)
    assert find.get("where", ["."]) == ["."], find


def test_setuptools_finds_only_shoal_packages():
    discovery = pytest.importorskip("setuptools.discovery")
    find = _package_find()["packages"]["find"]
    finder = discovery.PEP420PackageFinder if find.get("namespaces", True) else discovery.PackageFinder
    packages = finder.find(
        where=os.fspath(REPO),
        include=tuple(find.get("include", ("*",))),
        exclude=tuple(find.get("exclude", ())),
    )
    tops = {name.split(".")[0] for name in packages}
    assert tops == {"shoal"}, sorted(packages)
    for layer in LAYER_FOLDERS:
        assert f"shoal.{layer}" in packages, (layer, sorted(packages))
