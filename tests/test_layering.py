"""Command modules sit on top: nothing under dapo_jax/ imports them (read from the source,
function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dapo_jax"
COMMANDS = {"dapo_jax.export", "dapo_jax.eval", "dapo_jax.launch", "dapo_jax.train.__main__",
            "dapo_jax.experiments.compile", "dapo_jax.experiments.memory",
            "dapo_jax.experiments.mesh"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_no_module_imports_a_command_module():
    bad = {}
    for path in PACKAGE.rglob("*.py"):
        found = imports(path) & COMMANDS
        if found:
            bad[str(path.relative_to(PACKAGE.parent))] = sorted(found)
    assert not bad, bad
