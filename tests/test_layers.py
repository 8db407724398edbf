"""The layers import only downward (README "Layout", ../shared/ARCHITECTURE.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("app", "model", "feedback", "training", "migrations", "bench")


def _imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement under a top-level folder."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((str(path.relative_to(ROOT)), node.module))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_nothing_outside_tests_imports_or_reads_the_test_tree():
    imports = [(f, m) for folder in PRODUCT for f, m in _imports(folder) if _top(m) == "tests"]
    assert imports == []
    reads = [str(p.relative_to(ROOT)) for folder in PRODUCT for p in (ROOT / folder).rglob("*.py")
             if '"tests"' in p.read_text(encoding="utf-8") or "tests/data" in p.read_text(encoding="utf-8")]
    assert reads == []


def test_model_imports_nothing_of_ours_above_it():
    """model/ has no web and no database: it never imports app/ (settings reach it as CHAT_*
    variables) or feedback/ (verdicts are stored by feedback.moderation_repo.record_verdict)."""
    assert [(f, m) for f, m in _imports("model") if _top(m) in ("app", "feedback", "training")] == []


def _module_graph(folder: str) -> dict[str, set[str]]:
    """Every module under ``folder`` -> the modules of ours it imports, function-level imports included."""
    def name(path: Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in modules and t != mod}
    return graph


def test_model_modules_import_each_other_without_cycles():
    graph = _module_graph("model")
    state: dict[str, str] = {}
    cycles = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert graph["model.weights"] == set() and "model.loader" not in set().union(*graph.values())
    assert cycles == []
