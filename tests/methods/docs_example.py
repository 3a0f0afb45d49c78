"""The worked example of docs/adding-a-method.md, taken from the page itself, so that the generic
method suite proves the page's claim: a new low-rank method needs no other change to pass it."""

from __future__ import annotations

import contextlib
import re
import sys
import types
from pathlib import Path
from typing import Iterator

from paretune.core import registry

DOCS_EXAMPLE = "lora-fa"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "adding-a-method.md"


def example_source() -> str:
    """The page's Python block that registers a method."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if "@register(" in b]
    assert len(found) == 1, f"{PAGE} should hold one code block that registers a method"
    return found[0]


@contextlib.contextmanager
def docs_example_registered() -> Iterator[types.ModuleType]:
    """Run the page's example as a module (which registers its method); unregister it afterwards."""
    module = types.ModuleType("paretune_docs_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    try:
        exec(compile(example_source(), str(PAGE), "exec"), module.__dict__)  # noqa: S102 - our own docs page
        yield module
    finally:
        sys.modules.pop(module.__name__, None)
        if DOCS_EXAMPLE in registry.all_methods():
            registry.unregister(DOCS_EXAMPLE)
