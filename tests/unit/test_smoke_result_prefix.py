"""The smoke role finds smoke.py's result line by its prefix: the role's and the script's agree."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROLE = Path(__file__).resolve().parents[2] / "roles" / "vllm_smoke"


def test_the_role_reads_the_prefix_smoke_py_prints() -> None:
    tree = ast.parse((ROLE / "files" / "smoke.py").read_text())
    printed = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "RESULT_PREFIX" for t in node.targets)
    )
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert role_vars["_vllm_smoke_result_prefix"] == printed
