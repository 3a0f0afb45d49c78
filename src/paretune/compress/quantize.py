"""``quantize``: replace a model's Linear (and GPT-2 Conv1D) layers by
:class:`~paretune.compress.quantized.QuantizedLinear` in place (RTN k-bit groups, see
:mod:`paretune.compress.quantized` for the scheme, the bound and the packing)."""

from __future__ import annotations

import re
from typing import Sequence, Union

import torch
from torch import nn

from ..core.host import Host
from ..core.inject import embedding_names, iter_modules, output_head_names
from ..errors import ConfigError, ParetuneError, TargetError
from .quantized import (Axis, QuantizedLinear, check_axis, check_bits, check_group_size, group_length,
                        packed_bytes)

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None

Targets = Union[str, Sequence[str], None]
PRUNE_MASK = "prune_mask"  # the buffer paretune.compress.pruning keeps on a pruned module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds any QuantizedLinear."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """name -> QuantizedLinear of the model (a layer inside an adapter host under the host's name)."""
    out = {}
    for name, module in iter_modules(model):
        base = module.base if isinstance(module, Host) else module
        if isinstance(base, QuantizedLinear):
            out[name] = base
    return out


def _hit(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def select(model: nn.Module, targets: Targets, skip: Sequence[str] | None) -> list[str]:
    """Names of the Linear / Conv1D layers ``targets`` selects, less those ``skip`` names.

    ``targets``: None (every Linear / Conv1D), a regular expression matching whole names, or a list
    of names / name suffixes. ``skip``: names / suffixes left out; None means the output head(s)
    (``lm_head``, a classifier) and, though they are never Linear, the embeddings. A module whose
    weight is shared with a module that is not quantised (a tied output head) is refused."""
    linear = [n for n, m in iter_modules(model) if n and _is_linear(m)]
    if skip is None:
        skip_names = output_head_names(model) | embedding_names(model, "input")
        skipped = lambda n: n in skip_names  # noqa: E731
    else:
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ConfigError(f"skip={skip!r} must be a list of module names or suffixes, e.g. ['lm_head'].")
        skipped = lambda n: _hit(n, skip)  # noqa: E731
    if targets is None:
        chosen = [n for n in linear if not skipped(n)]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise TargetError(f"targets={targets!r} is not a valid regular expression ({e}).") from None
        chosen = [n for n in linear if pattern.fullmatch(n) and not skipped(n)]
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        chosen = [n for n in linear if _hit(n, targets) and not skipped(n)]
    else:
        raise TargetError(f"targets={targets!r} is not understood: give None (every Linear), a regex string, or a "
                          "list of module names / suffixes such as ['q_proj', 'v_proj'].")
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in linear})
        raise TargetError(
            f"quantize: targets {targets!r} matched no Linear / Conv1D layer (after skip={skip!r}). Linear layers "
            f"of this model end in: {', '.join(suffixes) or 'none (the model has no Linear layer)'}."
        )
    _refuse_tied(model, chosen)
    return chosen


def _refuse_tied(model: nn.Module, chosen: list[str]) -> None:
    chosen_set = set(chosen)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    for name in chosen:
        others = [o for o in owners.get(id(model.get_submodule(name).weight), []) if o not in chosen_set]
        if others:
            raise ConfigError(
                f"quantize: {name} shares its weight with {', '.join(others)} (tied weights); quantising it would "
                f"untie them. Leave {name} out (it is skipped by default) or quantise none of them."
            )


def _grouping_problems(model: nn.Module, names: list[str], group_size: int | None, axis: str) -> list[str]:
    bad = []
    for n in names:
        m = model.get_submodule(n)
        w = m.weight if isinstance(m, nn.Linear) else m.weight.T
        length = group_length(w.shape[0], w.shape[1], axis)
        if group_size is not None and length % group_size:
            bad.append(f"{n} (length {length})")
    return bad


@torch.no_grad()
def checked_layers(model: nn.Module, who: str, bits: int, group_size: int | None, axis: str, targets: Targets,
                   skip: Sequence[str] | None) -> list[str]:
    """The checks every quantising entry point (``quantize``, ``glowq``) runs before it changes
    anything, with ``who`` naming it in the messages; returns the selected layers' names. Refused:
    bits, axis or group size not offered; not a torch model; a model already quantised or carrying
    adapters; targets matching nothing; a group size that does not divide a selected layer."""
    check_bits(bits)
    check_axis(axis)
    check_group_size(group_size)
    if not isinstance(model, nn.Module):
        raise ParetuneError(f"{who} expects a torch model (nn.Module), not {type(model).__name__}.")
    if is_quantized(model):
        raise ParetuneError(
            f"{who}: this model is already quantised (it holds QuantizedLinear layers); quantising again would "
            "compound the rounding. Load the float model again (paretune.models.load) and quantise it once with the "
            "settings you want."
        )
    if any(isinstance(m, Host) for m in model.modules()):
        raise ParetuneError(
            f"{who}: this model carries adapters; quantise the base model first, then add adapters to it "
            "(paretune.adapt on the quantised model), or merge / unload the adapters before quantising."
        )
    try:
        names = select(model, targets, skip)
    except (TargetError, ConfigError) as e:
        raise type(e)(f"{who}: {str(e).removeprefix('quantize: ')}") from None
    bad = _grouping_problems(model, names, group_size, axis)
    if bad:
        raise ConfigError(
            f"{who}: group_size={group_size} does not divide the grouped length (axis={axis!r}) of "
            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; groups are not padded. Choose a group size "
            "that divides every length, group_size=None (whole channels), or leave those layers out of targets."
        )
    return names


def quantize(model: nn.Module, bits: int = 4, group_size: int | None = 128, axis: Axis = "out",
             targets: Targets = None, skip: Sequence[str] | None = None, progress: bool = True) -> nn.Module:
    """Quantise ``model``'s Linear / GPT-2 Conv1D layers in place to k-bit RTN groups and return it.

    ``bits``: 2, 3, 4 or 8. ``group_size``: entries per group (None: one group per whole channel);
    it must divide every selected layer's grouped length (in_features for ``axis="out"``,
    out_features for ``axis="in"``): groups are not padded. ``axis``: ``"out"`` groups along each
    output row (the usual), ``"in"`` along each input column (AdaDim's per-input-channel grouping).
    ``targets``: None (every Linear / Conv1D), a regex over whole module names, or a list of names /
    suffixes. ``skip``: names / suffixes left out; the default leaves out the output head
    (``lm_head``, whose weight is often tied to the embeddings) and the embeddings.

    Every check runs, and every layer is quantised, before the first one is swapped in: on any
    error the model is left as it was. Refused: bits or axis not offered, a group size that does not
    divide, targets matching nothing, a model already quantised or carrying adapters (quantise the
    base first, then add adapters), tied weights, weights beyond the float16 range.

    A pruned layer (a ``prune_mask`` from :func:`paretune.compress.prune`) is quantised with its
    pruned weights at zero and keeps its mask on the QuantizedLinear (a Conv1D's (in, out) mask
    turned to (out, in)), which zeroes the pruned positions of the dequantised weight exactly:
    round-to-nearest with a zero point alone would not give exact zeros."""
    names = checked_layers(model, "quantize", bits, group_size, axis, targets, skip)
    from ..progress import bar as progress_bar

    built: list[tuple[str, QuantizedLinear]] = []
    for name in progress_bar(names, desc=f"quantize {bits}-bit", unit="layer", enabled=progress, leave=False):
        module = model.get_submodule(name)
        mask = module._buffers.get(PRUNE_MASK)
        if mask is not None:
            with torch.no_grad():  # the pruned weights are zero in every forward already; make them so in storage
                module.weight.mul_(mask.to(module.weight.dtype))
        try:
            q = QuantizedLinear.from_module(module, bits=bits, group_size=group_size, axis=axis)
        except ParetuneError as e:
            raise type(e)(f"quantize: {name}: {e}") from None
        if mask is not None:
            q.register_buffer(PRUNE_MASK, (mask if isinstance(module, nn.Linear) else mask.T).contiguous(),
                              persistent=False)
        q.train(module.training)
        built.append((name, q))
    for name, q in built:  # nothing above changed the model; swapping cannot fail
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's linear layers (Linear, Conv1D, QuantizedLinear; bias included):
    ``stored`` as they are, ``float`` what the same layers take in their original dtype
    (QuantizedLinear: in·out weight entries at its ``dtype``), ``layers`` their number."""
    stored = full = layers = 0
    for _, m in iter_modules(model):
        m = m.base if isinstance(m, Host) else m
        if isinstance(m, QuantizedLinear):
            size = torch.empty((), dtype=m.dtype).element_size()
            stored += m.stored_bytes()
            full += (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)) * size
        elif _is_linear(m):
            n = sum(p.numel() * p.element_size() for p in (m.weight, m.bias) if p is not None)
            stored += n
            full += n
        else:
            continue
        layers += 1
    return {"stored": stored, "float": full, "layers": layers}


def expected_bytes(out_features: int, in_features: int, bits: int, group_size: int | None, axis: str) -> int:
    """The formula for one bias-free layer: packed codes + float16 scale and zero per group."""
    length = group_length(out_features, in_features, axis)
    rows = out_features if axis == "out" else in_features
    g = length if group_size is None else group_size
    return packed_bytes(out_features * in_features, bits) + 2 * 2 * rows * (length // g)
