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
    """model/ has no web: it never imports app/ (settings reach it as CHAT_* variables)."""
    assert [(f, m) for f, m in _imports("model") if _top(m) == "app"] == []
