"""The import direction: ``mimo`` at the bottom, ``loader`` above it, ``pipeline`` and ``runtime``
on top and never importing each other (``docs/architecture.md``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "mimo": {"mimo"},
    "loader": {"mimo", "loader"},
    "pipeline": {"mimo", "loader", "pipeline"},
    "runtime": {"mimo", "loader", "runtime"},
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in ``path`` (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downwards(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {
        str(f.relative_to(ROOT)): sorted(project_imports(f) - ALLOWED[package]) for f in files
    }
    assert not {f: w for f, w in wrong.items() if w}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from pipeline.plan import build_plan\n    import runtime.ops\n")
    assert project_imports(p) == {"pipeline", "runtime"}
