"""Built-in methods: one file per family, each registering itself on import."""

from . import lora, pissa  # noqa: F401
