"""Adapter folders by Hugging Face Hub id, as transformers finds models.

A path that exists is used as it is; a name that looks local (``./x``, ``/x``, ``~/x``, ``x/``)
but does not exist is an error that never reaches the network; anything else is a Hub id fetched
with ``huggingface_hub.snapshot_download`` (only the files the adapter format needs), which follows
the same rules as transformers: ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE``, tokens. Its
errors (offline and not cached, not found, gated, no network) become an :class:`AdapterFileError`
naming the id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import AdapterFileError


def resolve_adapter(path: str | os.PathLike, files: Sequence[str], what: str) -> Path:
    """The local folder of adapter ``path`` (``what``: e.g. "paretune adapter folder", for messages);
    ``files``: the glob patterns to download for a Hub id."""
    local = Path(os.path.expanduser(os.fspath(path)))
    if local.exists():
        if not local.is_dir():
            raise AdapterFileError(f"{local} is a file; give a {what}.")
        return local
    from .models import _looks_local

    text = os.fspath(path)
    if _looks_local(text):
        raise AdapterFileError(f"{text} does not exist; give a {what} or a Hugging Face Hub id (user/adapter).")
    try:
        from huggingface_hub import snapshot_download

        got = snapshot_download(text, allow_patterns=list(files))
    except Exception as e:  # the hub library's own errors (offline, not found, gated, network) all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        hint = (" HF_HUB_OFFLINE is set, so only adapters already in the Hugging Face cache can be used."
                if offline else " Check the id and your network, or download the folder and give its path.")
        raise AdapterFileError(f"{text!r} is not a local folder and could not be fetched from the Hugging Face Hub "
                               f"({type(e).__name__}: {first}).{hint}") from None
    return Path(got)
