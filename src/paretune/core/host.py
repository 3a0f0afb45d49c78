"""Host: wraps a base module and holds any number of named adapters (Deltas) on it."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ParetuneError
from .delta import Delta
from .geometry import geometry_for


def intercepted(module: nn.Module) -> bool:
    """Whether something stands between a call of ``module`` and its plain op: forward hooks
    (its own or global) or a replaced ``forward`` (accelerate's offloading hooks do that); then
    its output may be held elsewhere, and fast paths neither bypass the call nor write into it."""
    from torch.nn.modules import module as module_mod

    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def gathered_low_rank(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      slot: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """out + B[slot[i]] A[slot[i]] x for every row i at once: the factors of each row's adapter are
    gathered and applied as two batched matmuls (the BGMV idea of Punica / S-LoRA), instead of a
    loop over adapters. x (rows, ..., d_in), out (rows, ..., d_out). ``inplace``: add into
    ``out`` itself (it must be a fresh tensor nobody else holds), which saves a copy of it."""
    rows = x.shape[0]
    xs = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)
    h = torch.bmm(xs, a.index_select(0, slot).transpose(1, 2))  # (rows, tokens, R)
    up = b.index_select(0, slot).transpose(1, 2)
    base = out.reshape(rows, -1, out.shape[-1])
    if inplace and base.dtype == a.dtype and base.is_contiguous():
        return base.baddbmm_(h, up).view(out.shape)
    return torch.baddbmm(base.to(a.dtype), h, up).view(out.shape).to(out.dtype)


class Host(nn.Module):
    """A base module plus named deltas. ``forward`` runs the base, then each active, unmerged
    delta in order (``out = delta(x, out)``), or, inside :func:`paretune.per_sample`, each
    row's own delta."""

    def __init__(self, base: nn.Module):
        super().__init__()
        geometry = geometry_for(base)
        if geometry is None:
            raise ParetuneError(f"cannot host a {type(base).__name__}")
        self.base = base
        self.geometry = geometry
        self.deltas = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self._plan: list[tuple[str, torch.Tensor]] | None = None
        self._plan_rows = 0

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

    def add(self, name: str, delta: Delta) -> None:
        self.deltas[name] = delta

    @torch.no_grad()
    def add_to_bias(self, delta: torch.Tensor, sign: float) -> None:
        """b += sign * delta. Merging a bias change into a base without a bias (a Llama Linear)
        gives it a frozen zero bias first; when the last merged adapter is taken out again, a
        bias made that way is removed, so unmerge restores the module exactly."""
        base = self.base
        if self.geometry.bias is None:
            w = self.geometry.weight
            base.bias = nn.Parameter(torch.zeros(self.geometry.d_out, dtype=w.dtype, device=w.device),
                                     requires_grad=False)
            self._made_bias = True
        b = self.geometry.bias
        b.copy_((b.to(torch.promote_types(b.dtype, torch.float32)) + sign * delta.to(b.device)).to(b.dtype))
        if sign < 0 and getattr(self, "_made_bias", False) and not self.merged:
            base.bias = None
            self._made_bias = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._plan is not None:
            return self._forward_per_sample(x, self._modules["base"](x, *args, **kwargs))
        off_shifts, run = self._route()
        if len(run) == 1 and not off_shifts and not args and not kwargs:
            fused = run[0].fused_forward(x)  # base op and delta in one node, where the delta offers it
            if fused is not None:
                return fused
        out = self._modules["base"](x, *args, **kwargs)
        for delta in off_shifts:
            # a delta that changed the base at init (PiSSA's residual) gives the original base back
            # while it is off, so "off" always means the model as it was
            out = out + delta.unshift(x).to(out.dtype)
        for delta in run:
            out = delta(x, out)
        return out

    def _route(self) -> tuple[tuple[Delta, ...], tuple[Delta, ...]]:
        """(deltas whose base shift is undone, deltas run in order), cached until the active set,
        the merged set or the deltas change, so the forward pass does no per-call bookkeeping."""
        key = (self.active, tuple(self.merged), len(self.deltas))
        cached = self.__dict__.get("_route_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        deltas = self.deltas
        off = tuple(d for n, d in deltas.items() if d.shifts_base and n not in self.active)
        run = tuple(deltas[n] for n in self.active if n not in self.merged)
        self.__dict__["_route_cache"] = (key, (off, run))
        return off, run

    def _forward_per_sample(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self._plan_rows:
            raise ParetuneError(
                f"per_sample was given {self._plan_rows} adapter names but the batch has {x.shape[0]} rows; "
                "pass one name (or None) per row."
            )
        shifts = {n: d.unshift(x).to(out.dtype) for n, d in self.__dict__["_plan_shifting"]}
        for shift in shifts.values():
            out = out + shift  # the original base output for every row
        stacked = self._stacked_factors(x)
        if stacked is not None:
            # no gradients on this path; out is the base's fresh output unless a hook may hold it
            return gathered_low_rank(x, out, *stacked, inplace=not intercepted(self._modules["base"]))
        result = out
        for name, rows in self._plan:
            if name not in self.deltas:
                continue  # this adapter does not touch this module: base output for its rows
            rows = rows.to(out.device)
            base_rows = out.index_select(0, rows)
            if name in shifts:
                base_rows = base_rows - shifts[name].index_select(0, rows)
            sub = self.deltas[name](x.index_select(0, rows), base_rows)
            result = result.index_copy(0, rows, sub.to(result.dtype))
        return result

    def set_plan(self, plan: list[tuple[str, torch.Tensor]] | None, rows: int) -> None:
        """Install (or, with None, clear) a per-sample plan: for each adapter name its batch rows.
        What the gathered path needs from the plan (this module's adapters, each row's slot, the
        parameters whose versions tell if the stacked factors are stale) is worked out here, once
        per ``per_sample`` block, not on every call."""
        self._plan, self._plan_rows = plan, rows
        self.__dict__["_plan_info"] = None
        self.__dict__["_plan_shifting"] = None
        if plan is None:
            return
        self.__dict__["_plan_shifting"] = [(n, d) for n, d in self.deltas.items() if d.shifts_base]
        names = [n for n, _ in plan if n in self.deltas]
        slot = torch.zeros(rows, dtype=torch.long)
        for i, (name, row_ids) in enumerate(((n, r) for n, r in plan if n in self.deltas), start=1):
            slot[row_ids] = i
        params = [p for n in names for p in self.deltas[n].parameters()]
        self.__dict__["_plan_info"] = (names, slot, params, {})

    def _stacked_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For the gathered fast path: (A (N+1, R, d_in), B (N+1, d_out, R) with each adapter's
        scaling folded in, slot per row), slot 0 all zeros for rows with no adapter here; N = the
        plan's adapters on this module, R = their largest rank (smaller ones zero-padded). None when
        the fast path does not apply: gradients wanted, a kind other than Linear / Conv1D, a method
        without an exact LoRA form, or a rank so large the loop is cheaper."""
        info = self.__dict__.get("_plan_info")
        if info is None or self.kind not in ("linear", "conv1d") or x.dim() < 2:
            return None
        names, slot, params, slots = info
        if not names:
            return None  # no row's adapter touches this module: the loop path returns the base output
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        key = (tuple(names), tuple(p._version for p in params), x.device)
        cached = self.__dict__.get("_stack_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_stack_cache"] = self._stack(names, x.device, key)
        if cached[1] is None:
            return None  # not applicable to these adapters (decided once, not on every call)
        on_device = slots.get(x.device)
        if on_device is None:
            on_device = slots[x.device] = slot.to(x.device)  # moved once per block and device
        return cached[1], cached[2], on_device

    def _stack(self, names: list[str], device: torch.device, key: tuple) -> tuple:
        """(key, A stack, B stack) for :meth:`_stacked_factors`, or (key, None, None) when an
        adapter has no exact LoRA form or the largest rank makes the loop cheaper."""
        factors = [self.deltas[n].as_lora() for n in names]
        if any(f is None for f in factors):
            return key, None, None
        rank = max(f[0].shape[0] for f in factors)
        if 2 * rank > min(self.geometry.d_in, self.geometry.d_out):
            return key, None, None
        dtype = factors[0][0].dtype
        a = torch.zeros(len(factors) + 1, rank, self.geometry.d_in, dtype=dtype, device=device)
        b = torch.zeros(len(factors) + 1, self.geometry.d_out, rank, dtype=dtype, device=device)
        for i, (fa, fb, scale) in enumerate(factors, start=1):
            a[i, : fa.shape[0]] = fa.to(device=device, dtype=dtype)
            b[i, :, : fb.shape[1]] = fb.to(device=device, dtype=dtype) * scale
        return key, a, b

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}"
