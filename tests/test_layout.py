"""The pure core stays free of orchestration: nothing under src/peftflow imports prefect."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def test_core_does_not_import_prefect():
    offenders = []
    for path in (ROOT / "src" / "peftflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert not offenders, offenders
