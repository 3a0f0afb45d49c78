"""Host: wraps one base module and routes its calls through the named deltas on it."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ParetuneError
from .delta import Delta
from .geometry import geometry_for
from .serving import SamplePlan, StackCache
from .state import ModelState


class Host(nn.Module):
    """A base module plus named deltas. ``forward`` runs the base, then each active, unmerged
    delta in order (``out = delta(x, out)``); inside :func:`paretune.per_sample` its
    :class:`~paretune.core.serving.SamplePlan` runs each row's own delta instead.

    Which adapters are active or merged is read from the model's
    :class:`~paretune.core.state.ModelState` (the one place it lives), and the routing derived from
    it is cached until that state or the set of deltas changes."""

    def __init__(self, base: nn.Module, state: ModelState):
        super().__init__()
        geometry = geometry_for(base)
        if geometry is None:
            raise ParetuneError(f"cannot host a {type(base).__name__}")
        self.base = base
        self.geometry = geometry
        self.deltas = nn.ModuleDict()
        self.state = state
        self.plan: SamplePlan | None = None  # set inside a per_sample block
        self.stack_cache = StackCache()  # the gathered path's stacked factors
        self.made_bias = False  # whether merging gave a bias-free base its bias
        self._route_key: tuple | None = None
        self._route: tuple[tuple[Delta, ...], tuple[Delta, ...]] = ((), ())
        self._weights: tuple[float, ...] = ()  # the run's weights, when any is not 1

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "deltas"):
                raise
            return getattr(self._modules["base"], name)  # weight, bias, in_features, ...

    @property
    def kind(self) -> str:
        return self.geometry.kind

    @property
    def active(self) -> tuple[str, ...]:
        """The model's active adapters that have a delta here, in order."""
        return tuple(n for n in self.state.active if n in self.deltas)

    @property
    def merged(self) -> tuple[str, ...]:
        """The adapters merged into this base, in merge order."""
        return tuple(n for n in self.state.merged if n in self.deltas)

    def active_deltas(self) -> list[Delta]:
        return [self.deltas[n] for n in self.active]

    def add(self, name: str, delta: Delta) -> None:
        self.deltas[name] = delta

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._modules["base"]
        if self.plan is not None:
            return self.plan.forward(self, x, base(x, *args, **kwargs))
        off_shifts, run = self.route()
        if self._weights:
            return self._weighted(x, base(x, *args, **kwargs), off_shifts, run)
        if len(run) == 1 and not off_shifts:
            delta = run[0]
            if not args and not kwargs:
                fused = delta.fused_forward(x)  # base op and delta in one node, where the delta offers it
                if fused is not None:
                    return fused
            return delta.alone_forward(x, base(x, *args, **kwargs))
        out = base(x, *args, **kwargs)
        for delta in off_shifts:
            # a delta that changed the base at init (PiSSA's residual) gives the original base back
            # while it is off, so "off" always means the model as it was
            out = out + delta.unshift(x).to(out.dtype)
        for delta in run:
            out = delta(x, out)
        return out

    def _weighted(self, x, out, off_shifts, run):
        """The forward pass with weighted adapters: each delta's change of the output, scaled."""
        for delta in off_shifts:
            out = out + delta.unshift(x).to(out.dtype)
        for delta, w in zip(run, self._weights):
            # a delta may add into the tensor it is given (at inference): keep ``out`` for the weighting
            out = delta(x, out) if w == 1.0 else out + (delta(x, out.clone()) - out) * w
        return out

    def route(self) -> tuple[tuple[Delta, ...], tuple[Delta, ...]]:
        """(deltas whose base shift is undone, deltas run in order), cached until the active set,
        the merged set or the deltas change, so the forward pass does no per-call bookkeeping."""
        key = (self.state.version, len(self.deltas))
        if key != self._route_key:  # (api functions refresh it right after each change)
            active, merged = self.active, self.merged
            off = tuple(d for n, d in self.deltas.items() if d.shifts_base and n not in active)
            names = [n for n in active if n not in merged]
            run = tuple(self.deltas[n] for n in names)
            weights = tuple(self.state.weight(n) for n in names)
            self._weights = weights if any(w != 1.0 for w in weights) else ()
            self._route_key, self._route = key, (off, run)
        return self._route

    # -- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W += ΔW (and b += Δb) of delta ``name``."""
        delta = self.deltas[name]
        sparse = delta.sparse_delta()
        if sparse is not None:  # only the entries ΔW has
            self.geometry.add_at(*sparse)
        else:
            self.geometry.add_to_weight(delta.delta_weight())
        self._keep_pruned()
        db = delta.delta_bias()
        if db is not None:
            self._add_to_bias(db, 1.0)

    @torch.no_grad()
    def unmerge(self, name: str, *, last: bool) -> None:
        """Take delta ``name`` back out of the base; ``last``: no other adapter stays merged here
        (then a bias that merging gave a bias-free base is removed again)."""
        delta = self.deltas[name]
        sparse = None if delta.depends_on_base else delta.sparse_delta()
        if sparse is not None:
            self.geometry.add_at(*sparse, sign=-1.0)
            db = delta.delta_bias()
        else:
            dw, db = delta.merged_deltas()
            self.geometry.add_to_weight(dw, sign=-1.0)
        self._keep_pruned()
        if db is not None:
            self._add_to_bias(db, -1.0)
        if last and self.made_bias:
            self.base.bias = None
            self.made_bias = False

    def _keep_pruned(self) -> None:
        """A pruned base (``paretune.compress.prune`` leaves a ``prune_mask`` buffer, True where a
        weight is kept) stays pruned after a merge: the weights the mask removed are zero again."""
        mask = self.base._buffers.get("prune_mask")
        if mask is not None:
            self.geometry.weight.mul_(mask.to(self.geometry.weight.dtype))

    def _add_to_bias(self, delta: torch.Tensor, sign: float) -> None:
        """b += sign * delta. A base without a bias (a Llama Linear) gets a frozen zero bias first."""
        if self.geometry.bias is None:
            w = self.geometry.weight
            self.base.bias = nn.Parameter(torch.zeros(self.geometry.d_out, dtype=w.dtype, device=w.device),
                                          requires_grad=False)
            self.made_bias = True
        b = self.geometry.bias
        b.copy_((b.to(torch.promote_types(b.dtype, torch.float32)) + sign * delta.to(b.device)).to(b.dtype))

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={list(self.merged)}"


class BlockHost(Host):
    """A host around a whole sub-layer (kind "block": an attention or MLP block), called as the
    model calls that block: the hidden states are the first positional argument or the
    ``hidden_states`` keyword, and a tuple output (attention's (output, weights)) has its first
    element adapted. Its deltas add modules around the block (``forward(x, base_out)``, x the
    block's input hidden states); nothing merges into a block."""

    def forward(self, *args, **kwargs):
        base = self._modules["base"]
        x = args[0] if args else kwargs.get("hidden_states")
        out = base(*args, **kwargs)
        if x is None:
            raise ParetuneError(f"{type(base).__name__} was called without hidden states (first argument or "
                                "hidden_states=...); a block adapter cannot find its input.")
        if self.plan is not None:
            raise ParetuneError("per-sample adapters are not offered on block adapters; run each adapter's rows "
                                "as their own batch.")
        main = out[0] if isinstance(out, tuple) else out
        run = self.route()[1]
        for delta, w in zip(run, self._weights or (1.0,) * len(run)):
            main = delta(x, main) if w == 1.0 else main + (delta(x, main.clone()) - main) * w
        return (main, *out[1:]) if isinstance(out, tuple) else main
