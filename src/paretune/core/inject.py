"""Target matching (names, suffixes, regex, "all-linear") and wrapping / unwrapping of hosts."""

from __future__ import annotations

import hashlib
import re
import warnings
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from ..errors import TargetError
from .geometry import geometry_for
from .host import BlockHost, Host
from .state import ModelState, has_state, state_of

Targets = Union[str, Sequence[str], None]
LINEAR_KINDS = ("linear", "conv1d")


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the model's modules; a host stands for the module it wraps, under the
    same name, and is not descended into, except a block host (a whole sub-layer), whose base's
    children are listed under its name."""

    def walk(prefix: str, module: nn.Module):
        yield prefix, module
        if isinstance(module, Host):
            if module.kind != "block":
                return
            module = module.base
        for child_name, child in module._modules.items():
            if child is not None:
                yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def kind_of(module: nn.Module) -> str | None:
    if isinstance(module, Host):
        return module.kind
    try:
        g = geometry_for(module)
    except TargetError:
        return None
    return g.kind if g is not None else None


def embedding_names(model: nn.Module, which: str) -> set[str]:
    """Names of the module ``model.get_{which}_embeddings()`` returns ("input" or "output"),
    wrapped in a host or not; empty when the model has no such method or it fails."""
    get = getattr(model, f"get_{which}_embeddings", None)
    target = None
    if callable(get):
        try:
            target = get()
        except Exception:
            target = None
    if target is None:
        return set()
    return {name for name, module in iter_modules(model)
            if name and (module is target or (isinstance(module, Host) and module.base is target))}


def targets_by_model_type(model: nn.Module, table: dict, method: str, hint: str):
    """``table[model.config.model_type]`` (a method's default targets per architecture); a
    TargetError naming the known architectures and ``hint`` (what to pass as targets) otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise TargetError(
            f"{method}: no default targets for a {type(model).__name__} (model_type={model_type!r}; known: "
            f"{', '.join(sorted(table))}). {hint}"
        )
    return table[model_type]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves out (as PEFT does)."""
    heads = embedding_names(model, "output")
    if not heads:
        for name, _ in iter_modules(model):
            if name.split(".")[-1] in ("lm_head", "classifier", "score"):
                heads.add(name)
    return heads


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a hostable type cannot be hosted (e.g. a grouped Conv2d), else None."""
    try:
        geometry_for(module)
    except TargetError as e:
        return str(e)
    return None


def _candidates_text(names: list[str], limit: int = 40) -> str:
    if not names:
        return "the model has no module of a kind this method adapts"
    suffixes = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"module names: {shown}; suffixes: {', '.join(suffixes)}"


def base_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the base module behind ``module``: a host stands for
    the module it wraps (its adapters' tensors are not the base's), also for hosts nested inside a
    block host."""
    if isinstance(module, Host):
        module = module.base
    for name, p in module._parameters.items():
        if p is not None:
            yield f"{prefix}{name}", p
    for child_name, child in module._modules.items():
        if child is not None:
            yield from base_tensors(child, f"{prefix}{child_name}.")


_CHUNK = 1 << 24  # bytes copied to the CPU and hashed at a time (16 MiB), so a GPU weight is streamed


@torch.no_grad()
def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of the base weights of ``module`` (every parameter of the module a host wraps, in
    order, each as its name, dtype, shape and raw bytes). The bytes are hashed as stored: the same
    weights in another dtype give another hash. A tensor on an accelerator is copied to the CPU in
    16 MiB pieces, so no second copy of a large weight is made."""
    h = hashlib.sha256()
    for name, t in base_tensors(module):
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        flat = t.detach().reshape(-1).view(torch.uint8) if t.numel() else None
        if flat is None:
            continue
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start:start + _CHUNK]
            h.update(memoryview(piece.cpu().contiguous().numpy()))
    return h.hexdigest()


def _snapshot_base(model: nn.Module, names: list[str], method: str) -> None:
    """For a method that changes the base weights when built (``shifts_base``, PiSSA), record the
    SHA-256 of each target's base weights on the model's state before it does, so that a saved
    adapter's fingerprint names the weights it was built on exactly (the residual moved back in
    is not bit-for-bit the original)."""
    from . import registry  # the registry imports nothing of the engine at import time

    if not method or not has_state(model):
        return
    try:
        spec = registry.get(method)
    except Exception:
        return
    if not spec.delta_cls.shifts_base:
        return
    st = state_of(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, Host) and any(d.shifts_base and n not in module.merged for n, d in module.deltas.items()):
            continue  # already shifted by an earlier adapter: its snapshot holds the original
        st.base_sha256[name] = weights_sha256(module)


def match_targets(model: nn.Module, targets: Targets, kinds: Sequence[str], method: str = "") -> list[str]:
    """Names of the modules ``targets`` selects among those of a kind the method supports.

    * ``None`` or ``"all-linear"``: every Linear / Conv1D except the output head;
    * a string: a regular expression that must match the whole module name;
    * a list of strings: exact module names or name suffixes (``"q_proj"`` matches
      ``model.layers.0.self_attn.q_proj``).

    For a registered ``method`` that changes the base weights when built (PiSSA), the SHA-256 of
    each chosen module's base weights is recorded on the model's adapter state (when it has one)
    before that happens; see :func:`weights_sha256`.
    """
    chosen = _match(model, targets, kinds, method)
    _snapshot_base(model, chosen, method)
    return chosen


def _match(model: nn.Module, targets: Targets, kinds: Sequence[str], method: str = "") -> list[str]:
    modules = list(iter_modules(model))
    supported = [(n, m) for n, m in modules if n and kind_of(m) in kinds]
    supported_names = [n for n, _ in supported]
    if targets is None or targets == "all-linear":
        heads = output_head_names(model)
        chosen = [n for n, m in supported if kind_of(m) in LINEAR_KINDS and n not in heads]
        if not chosen:
            raise TargetError(
                f"{method}: 'all-linear' found no Linear/Conv1D layer besides the output head. "
                f"Name targets explicitly; {_candidates_text(supported_names)}."
            )
        return chosen
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise TargetError(f"targets={targets!r} is not a valid regular expression ({e}).") from None
        chosen = [n for n in supported_names if pattern.fullmatch(n)]
        others = [n for n, m in modules if n and n not in chosen and pattern.fullmatch(n)]
    elif isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets) and len(targets) > 0:
        def hit(name: str) -> bool:
            return any(name == t or name.endswith("." + t) for t in targets)

        chosen = [n for n in supported_names if hit(n)]
        others = [n for n, m in modules if n and n not in chosen and hit(n)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
        if chosen and unmatched:
            warnings.warn(f"{method}: targets {unmatched} matched no module; adapting {len(chosen)} others.")
    else:
        raise TargetError(
            f"targets={targets!r} is not understood: give 'all-linear', a regex string, or a list of module "
            "names / suffixes such as ['q_proj', 'v_proj']."
        )
    if not chosen:
        if others:
            by_name = dict(modules)
            reasons = [r for r in (_unsupported_reason(by_name[n]) for n in others) if r]
            if reasons:
                raise TargetError(f"{method}: targets {targets!r}: {reasons[0]}")
            types = sorted({type(by_name[n]).__name__ for n in others})
            raise TargetError(
                f"{method}: targets {targets!r} matched only modules of type {', '.join(types)} "
                f"({', '.join(others[:10])}), which {method or 'this method'} cannot adapt "
                f"(it adapts: {', '.join(kinds)}). Candidates: {_candidates_text(supported_names)}."
            )
        raise TargetError(
            f"{method}: targets {targets!r} matched no module. Candidates: {_candidates_text(supported_names)}."
        )
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, Host):  # inside a block host: the child belongs to the wrapped module
        parent = parent.base
    setattr(parent, child, new)


def wrap(model: nn.Module, name: str, state: ModelState) -> Host:
    """The host at ``name``, wrapping the module there first if it is not one yet (a new host
    reads the active and merged sets from ``state``, the model's)."""
    module = model.get_submodule(name)
    if isinstance(module, Host):
        return module
    host = BlockHost(module, state) if kind_of(module) == "block" else Host(module, state)
    host.geometry.name = name
    host.geometry.host = host
    host.geometry.root = model
    _set_module(model, name, host)
    return host


def unwrap(model: nn.Module, name: str) -> nn.Module:
    """Put the host's base module back in its place; returns the base module."""
    host = model.get_submodule(name)
    if not isinstance(host, Host):
        return host
    _set_module(model, name, host.base)
    return host.base


def hosts(model: nn.Module) -> Iterator[tuple[str, Host]]:
    """(name, host) for every host in the model."""
    for name, module in iter_modules(model):
        if isinstance(module, Host):
            yield name, module
