"""Parallel composition: the same inputs through several adapters in one forward pass.

AdapterHub's ``Parallel`` block (Rücklé et al. 2021, "AdapterDrop") replicates the batch once per
adapter so that each copy runs its own adapter, one forward pass for all of them. Here it is built
on :func:`paretune.per_sample`: the batch is repeated ``len(names)`` times, copy k runs adapter
``names[k]`` (``None``: the bare base), and the output is split back into one output per name.

Choices, stated: the inputs are replicated before the model (AdapterHub replicates inside it, at
the first adapter layer; the outputs are the same, this costs the layers below the first adapter
once per name). Every tensor argument whose first dimension is the batch size is repeated; other
arguments are passed unchanged. A key/value cache is switched off (``use_cache=False``) unless the
caller sets ``use_cache``, because one cache cannot be split between adapters.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .api import per_sample
from .errors import ParetuneError


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ParetuneError("parallel needs at least one tensor input with a batch dimension (e.g. input_ids=...).")


def _repeat(value: Any, batch: int, copies: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


def _split(value: Any, batch: int, copies: int) -> list[Any]:
    """``value`` cut along the batch into ``copies`` parts (nested outputs part by part; anything that
    is not a batched tensor is shared by every part)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch * copies:
            return list(value.split(batch))
        return [value] * copies
    if isinstance(value, Mapping):
        parts = {k: _split(v, batch, copies) for k, v in value.items()}
        return [type(value)(**{k: p[i] for k, p in parts.items()}) if _rebuilds(value)
                else {k: p[i] for k, p in parts.items()} for i in range(copies)]
    if isinstance(value, (tuple, list)):
        parts = [_split(v, batch, copies) for v in value]
        return [type(value)(p[i] for p in parts) for i in range(copies)]
    return [value] * copies


def _rebuilds(value: Mapping) -> bool:
    """Whether ``type(value)(**fields)`` rebuilds the mapping (a dict, or transformers' ModelOutput)."""
    try:
        type(value)(**dict(value))
    except TypeError:
        return False
    return True


def _takes_use_cache(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params


def parallel(model: nn.Module, names: Sequence[str | None], *args: Any, **kwargs: Any) -> list[Any]:
    """Run ``model(*args, **kwargs)`` once through each adapter of ``names`` in one forward pass
    (AdapterHub's ``Parallel``); returns one output per name, in order.

    >>> out_a, out_b, base = paretune.parallel(model, ["a", "b", None], input_ids=ids, attention_mask=mask)

    Offered where :func:`paretune.per_sample` is (not for virtual-token methods or block adapters,
    which say so); the outputs equal running each adapter alone.
    """
    names = list(names)
    if not names:
        raise ParetuneError("parallel needs at least one adapter name (None for the bare base).")
    batch = _batch_size(args, kwargs)
    copies = len(names)
    if "use_cache" not in kwargs and _takes_use_cache(model):
        kwargs["use_cache"] = False
    args = tuple(_repeat(a, batch, copies) for a in args)
    kwargs = {k: _repeat(v, batch, copies) for k, v in kwargs.items()}
    rows = [name for name in names for _ in range(batch)]
    with per_sample(model, rows):
        out = model(*args, **kwargs)
    return _split(out, batch, copies)
