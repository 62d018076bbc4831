"""The layers of docs/design.md ("Layers"), checked on the source: the import-linter contract in pyproject.toml,
no import cycle between modules, and no project import hidden inside a function body."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = {
    "ddpm": "ddpm",
    "runtime": "ddpm.runtime",
    "trainer": "ddpm.trainer",
    "export": "ddpm.export",
    "bench": "ddpm.bench",
    "evaluation": "ddpm.evaluation",
    "serve": "ddpm.serve",
}
# The compiled extensions are optional: importing them inside a function is how a CPU-only or source install
# keeps working (docs/design.md, "Kernels").
ALLOWED_LOCAL = {"ddpm._C", "ddpm._C_cuda"}


def _sources():
    for folder, package in SOURCE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([package, *parts]), path.name == "__init__.py"


def test_import_linter_contract_holds():
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_every_core_module_is_in_the_core_contract():
    """A new module in ddpm/ is core: the contract must name it, or it could import upwards unnoticed."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in config["contracts"] if c["id"] == "core")
    on_disk = {
        f"ddpm.{p.stem}"
        for p in (ROOT / "ddpm").glob("*.py")
        if p.stem not in ("__init__", "__main__", "cli")
    }
    assert on_disk - set(core["source_modules"]) == set()


def _real(module: str) -> bool:
    # The editable install puts the repository root on ddpm.__path__, so grimp also sees phantom names such as
    # ddpm.ddpm.* and ddpm.tests.*; only the mapped source folders are the package.
    head = module.split(".")[1] if "." in module else ""
    return module == "ddpm" or head not in (
        "ddpm",
        "tests",
        "benchmarks",
        "csrc",
        "scripts",
        "build",
        "docs",
        "tools",
    )


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    # TYPE_CHECKING imports count: a cycle hidden behind them is still a cycle of the design
    graph = grimp.build_graph("ddpm", cache_dir=None, exclude_type_checking_imports=False)
    nodes = sorted(m for m in graph.modules if _real(m))
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if _real(d) and d != m} for m in nodes}
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in nodes:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _local_project_imports(path: Path, module: str, is_package: bool) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(
                        base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                    )
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if (name == "ddpm" or name.startswith("ddpm.")) and name not in ALLOWED_LOCAL:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return found


def test_no_function_local_project_imports():
    """A project import inside a function body usually hides a cycle; only optional compiled modules may be
    imported there, and command modules (cli*.py), whose bodies import the library so that `ddpm --help` loads
    no torch (docs/design.md, "Layers")."""
    bad = [
        hit
        for path, mod, pkg in _sources()
        if not path.name.startswith("cli")
        for hit in _local_project_imports(path, mod, pkg)
    ]
    assert not bad, "function-local project imports:\n" + "\n".join(bad)


def test_no_source_file_over_400_lines():
    long = [
        f"{p.relative_to(ROOT)}: {n}"
        for p, _, _ in _sources()
        if (n := len(p.read_text().splitlines())) > 420
    ]
    assert not long, f"files over ~400 lines: {long}"
