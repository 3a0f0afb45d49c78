"""Every ```python snippet in README.md runs as written.

The default run checks that each snippet compiles and that every ``paretune.<name>`` it uses
exists; the slow test (``-m slow``) runs them all, in order, in one namespace, in an empty
temporary folder, on the bundled SmolLM2 model as the README does, and prints each one's time."""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

import pytest

import paretune

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_snippets_that_compile():
    blocks = python_blocks()
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        compile(code, f"README.md python block {i}", "exec")


def test_readme_uses_only_public_names_that_exist():
    for code in python_blocks():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paretune":
                assert hasattr(paretune, node.attr), f"README uses paretune.{node.attr}, which does not exist"


def test_readme_names_are_defined_before_use():
    """Each snippet only uses names that it or an earlier snippet defines (no undefined input_ids)."""
    import builtins

    defined = set(dir(builtins))
    for i, code in enumerate(python_blocks()):
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                assert node.id in defined, f"README python block {i} uses {node.id!r} before defining it"


@pytest.mark.slow
def test_readme_snippets_run(tmp_path, capsys):
    namespace: dict = {"__name__": "__readme__"}
    old = os.getcwd()
    os.chdir(tmp_path)
    times = []
    try:
        for i, code in enumerate(python_blocks()):
            start = time.perf_counter()
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
            times.append(time.perf_counter() - start)
    finally:
        os.chdir(old)
    assert (tmp_path / "my-adapter" / "paretune.json").is_file()
    with capsys.disabled():
        print("\nREADME python blocks, seconds:", [round(t, 1) for t in times])
