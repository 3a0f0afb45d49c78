"""Per-sample serving: inside :func:`paretune.per_sample`, row i of a batch runs its own adapter.

Each host gets a :class:`SamplePlan` for the block. Its forward takes the gathered fast path
(:func:`paretune.core.fast.gathered_low_rank`: every row's ``as_lora()`` factors stacked, zero-padded
to the largest rank, scaling folded in, two batched matmuls) where it applies, and otherwise the
reference loop over adapters, one group of rows at a time (methods without a LoRA form, training
with gradients, Embedding / Conv2d hosts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ParetuneError
from .fast import MATMUL_KINDS, gathered_low_rank, intercepted

if TYPE_CHECKING:
    from .host import Host

Groups = list[tuple[str, torch.Tensor]]  # (adapter name, its batch rows)


class StackCache:
    """A host's stacked factors for the gathered path, kept across ``per_sample`` blocks until the
    adapters, a parameter (its version counter) or the device change."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.a: torch.Tensor | None = None  # (N + 1, R, d_in); None: the fast path does not apply
        self.b: torch.Tensor | None = None  # (N + 1, d_out, R), scaling folded in


class SamplePlan:
    """One host's share of a per-sample block: which of its adapters serve which rows.

    Worked out once per block (not on every call): the adapters of the block that this host holds,
    each row's slot in the stacked factors (0: no adapter here), the parameters whose versions say
    whether the stacked factors are stale, and the deltas whose base shift must be undone."""

    def __init__(self, host: "Host", groups: Groups, rows: int):
        self.groups = groups
        self.rows = rows
        self.shifting = [(n, d) for n, d in host.deltas.items() if d.shifts_base]
        self.names = [n for n, _ in groups if n in host.deltas]
        self.slot = torch.zeros(rows, dtype=torch.long)
        for i, name in enumerate(self.names, start=1):
            self.slot[dict(groups)[name]] = i
        self.params = [p for n in self.names for p in host.deltas[n].parameters()]
        self._slot_on: dict[torch.device, torch.Tensor] = {}

    def forward(self, host: "Host", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The host's output for a batch whose rows each use their own adapter; ``out`` is the
        base module's output."""
        if x.shape[0] != self.rows:
            raise ParetuneError(
                f"per_sample was given {self.rows} adapter names but the batch has {x.shape[0]} rows; "
                "pass one name (or None) per row."
            )
        shifts = {n: d.unshift(x).to(out.dtype) for n, d in self.shifting}
        for shift in shifts.values():
            out = out + shift  # the original base output for every row
        stacked = self.stacked(host, x)
        if stacked is not None:
            # no gradients on this path; out is the base's fresh output unless a hook may hold it
            return gathered_low_rank(x, out, *stacked, inplace=not intercepted(host.base))
        return self.loop(host, x, out, shifts)

    def loop(self, host: "Host", x: torch.Tensor, out: torch.Tensor,
             shifts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference path: each adapter on its own rows."""
        result = out
        for name, rows in self.groups:
            if name not in host.deltas:
                continue  # this adapter does not touch this module: base output for its rows
            rows = rows.to(out.device)
            base_rows = out.index_select(0, rows)
            if name in shifts:
                base_rows = base_rows - shifts[name].index_select(0, rows)
            sub = host.deltas[name](x.index_select(0, rows), base_rows)
            result = result.index_copy(0, rows, sub.to(result.dtype))
        return result

    def stacked(self, host: "Host", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A stack, B stack, slot per row) for the gathered path, or None when it does not apply:
        gradients wanted, a kind other than Linear / Conv1D, no adapter of the block here, a method
        without an exact LoRA form, or a rank so large that the loop is cheaper."""
        if host.kind not in MATMUL_KINDS or x.dim() < 2 or not self.names:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params):
            return None
        cache = host.stack_cache
        key = (tuple(self.names), tuple(p._version for p in self.params), x.device)
        if cache.key != key:
            cache.key = key
            cache.a, cache.b = stack_factors(host, self.names, x.device)
        if cache.a is None:
            return None  # not applicable to these adapters (decided once, not on every call)
        slot = self._slot_on.get(x.device)
        if slot is None:
            slot = self._slot_on[x.device] = self.slot.to(x.device)  # moved once per block and device
        return cache.a, cache.b, slot


def stack_factors(host: "Host", names: list[str], device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """(A (N+1, R, d_in), B (N+1, d_out, R)) of the named adapters' ``as_lora()`` factors, each
    adapter's scaling folded into B, slot 0 all zeros (rows with no adapter here), N = len(names),
    R = the largest rank (smaller ones zero-padded); (None, None) when an adapter has no exact LoRA
    form or 2R exceeds min(d_in, d_out) (then the loop is cheaper)."""
    factors = [host.deltas[n].as_lora() for n in names]
    if any(f is None for f in factors):
        return None, None
    g = host.geometry
    rank = max(f[0].shape[0] for f in factors)
    if 2 * rank > min(g.d_in, g.d_out):
        return None, None
    dtype = factors[0][0].dtype
    a = torch.zeros(len(factors) + 1, rank, g.d_in, dtype=dtype, device=device)
    b = torch.zeros(len(factors) + 1, g.d_out, rank, dtype=dtype, device=device)
    for i, (fa, fb, scale) in enumerate(factors, start=1):
        a[i, : fa.shape[0]] = fa.to(device=device, dtype=dtype)
        b[i, :, : fb.shape[1]] = fb.to(device=device, dtype=dtype) * scale
    return a, b
