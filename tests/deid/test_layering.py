"""``umit.deid`` is in the ground layer: it imports no pipeline stage."""

from __future__ import annotations

import ast
from pathlib import Path

import umit.deid

ALLOWED = ("umit.deid", "umit.errors", "umit.config", "umit.utils", "umit.data")


def test_deid_imports_only_the_ground_layer():
    root = Path(umit.deid.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "umit":
                    names = [f"umit.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("umit.") and name != "umit.__version__":
                    assert name.startswith(ALLOWED), f"{path.name} imports {name}"
