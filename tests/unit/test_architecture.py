"""The package's shape: no import cycles, imports of our own modules at the top of the file, short functions.

These guard the architecture described in the README's layout section (folders that name the data-flow stages):
a module may import any module of a lower stage, never one that imports it back, and every import of a
`topd_megatron` module sits at the top of its file so that the dependency graph is visible from the file heads.
Local imports stay allowed for heavy third-party modules (Megatron-Core, SGLang, transformers, ...).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "topd_megatron"
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_ALLOWED = ("plan/",)
"""The planner's formula tables (one line per modelled quantity) may run longer."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "cpu_shim" not in p.parts}


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported topd_megatron module, line, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = set()
    for stmt in tree.body:  # module level, including the bodies of module-level `if` / `try` blocks
        top_level.add(id(stmt))
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(stmt) if not isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        for name in names:
            if name == "topd_megatron" or name.startswith("topd_megatron."):
                out.append((name, node.lineno, id(node) in top_level))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(path, known):
            parts = target.split(".")
            # importing a.b.c runs the __init__ of a.b (and a) first
            for i in range(2, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name and not name.startswith(prefix + "."):
                    graph[name].add(prefix)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_package_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_package_modules_import_each_other_at_the_top_of_the_file() -> None:
    modules = _modules()
    local = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for path in modules.values()
        for target, line, top in _imports(path, set(modules))
        if not top
    ]
    assert not local, "imports of topd_megatron modules inside functions:\n" + "\n".join(local)


def test_functions_stay_short() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith(LONG_FUNCTION_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_recipes_is_not_installed_as_a_top_level_package(tmp_path: Path) -> None:
    """`recipes/` stays in the repository; installing the project must not claim the name `recipes`."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('recipes') is None else 1)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, "a top-level package named 'recipes' is importable outside the repository"
