"""Host: wraps a base module and holds any number of named adapters (Deltas) on it."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ParetuneError
from .delta import Delta
from .geometry import geometry_for


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
        out = self.base(x, *args, **kwargs)
        if self._plan is not None:
            return self._forward_per_sample(x, out)
        for name, delta in self.deltas.items():
            # a delta that changed the base at init (PiSSA's residual) gives the original base back
            # while it is off, so "off" always means the model as it was
            if delta.shifts_base and name not in self.active:
                out = out + delta.unshift(x).to(out.dtype)
        for name in self.active:
            if name not in self.merged:
                out = self.deltas[name](x, out)
        return out

    def _forward_per_sample(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self._plan_rows:
            raise ParetuneError(
                f"per_sample was given {self._plan_rows} adapter names but the batch has {x.shape[0]} rows; "
                "pass one name (or None) per row."
            )
        shifts = {n: d.unshift(x).to(out.dtype) for n, d in self.deltas.items() if d.shifts_base}
        for shift in shifts.values():
            out = out + shift  # the original base output for every row
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

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}"
