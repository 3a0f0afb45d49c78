"""The layering of the package, checked on the source: the core imports nothing above it, and
the methods import only the core (and each other), never the api, the trainer or the bench."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import paretune

PACKAGE = Path(paretune.__file__).parent
# what each layer may import from paretune (besides itself)
ALLOWED = {
    "core": {"paretune.core", "paretune.errors"},
    "methods": {"paretune.core", "paretune.errors", "paretune.methods"},
}


def module_name(path: Path) -> str:
    return "paretune." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def paretune_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of a paretune module in ``path``, the file of
    module ``module`` (relative imports resolve against its package)."""
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "paretune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "paretune":
                continue
            if node.module is None:  # from .. import x: x is a module of that package
                found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, name))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(PACKAGE)}:{line} imports {name}"
           for f in files for line, name in paretune_imports(f, module_name(f))
           if not any(name == a or name.startswith(a + ".") for a in ALLOWED[layer])]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_walker_sees_relative_and_absolute_imports(tmp_path):
    """The check above can fail: an upward import written either way is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..api import adapt\nimport paretune.bench\nfrom . import registry\nimport torch\n",
                     encoding="utf-8")
    names = [n for _, n in paretune_imports(probe, "paretune.core.probe")]
    assert names == ["paretune.api", "paretune.bench", "paretune.core.registry"]
