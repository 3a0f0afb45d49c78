"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen and Vulić, ACL 2022,
"Composable Sparse Fine-Tuning for Cross-Lingual Transfer"; code cambridgeltl/composable-sft).

    y = W₀x + ΔW x,    ΔW non-zero at K chosen entries only

**What the paper / reference do** (commit 29f7872 of cambridgeltl/composable-sft,
``src/sft/lt_sft.py`` ``train`` and ``unfreeze_k_most_changed_params``, ``src/sft/trainer.py``):

1. phase 1: every maskable parameter is fine-tuned (a full Trainer run, fresh optimizer and lr
   schedule, ``full_ft_*_per_iteration`` steps/epochs);
2. the K parameters whose |θ₁ − θ₀| is largest are selected by one *global* threshold over all
   maskable parameters together (``np.partition`` of every |Δ|, ``thresh`` = the K-th largest,
   mask = ``abs_delta >= thresh``, so ties at the threshold can add entries beyond K);
3. every parameter is reset to its value before phase 1 (θ₀), the optimizer and lr scheduler are
   rebuilt (``self.optimizer = None``), and phase 2 trains with the gradient of the parameters
   outside the mask multiplied by zero (``p.grad *= self._mask[n]``) for
   ``sparse_ft_*_per_iteration`` steps/epochs;
4. the result is the difference θ₂ − θ₀ (an SFT: values at the changed positions).

K: ``ft_params_num``, else ``ft_params_proportion`` (default 0.01) × the number of maskable
parameters (``sft_args.py``). The example scripts give both phases the same length
(``train_nli.sh``: 5 + 5 epochs; ``train_mlm.sh``: 100,000 + 100,000 max steps), hence the default
``phase1_fraction`` = 0.5 here. ``n_ft_iterations`` (default 1) repeats the two phases; only one
iteration is implemented here. The L1 regularisation options (default 0) are not implemented.

**Here** (one ``paretune train`` run, driven by :meth:`LtSftDelta.on_step`):

* Each adapted layer holds a dense trainable ΔW (``delta``, (d_out, d_in), zero at the start, in
  the adapter precision), applied as ``base_out + ΔW x``. Phase 1 trains all of it.
* The switch happens in ``on_step(s, T)`` with s = the switch step
  ``min(max(1, round(phase1_fraction·T)), max(1, T − 1))`` (so phase 2 gets at least one step when
  T >= 2): the K largest |ΔW| are selected, ΔW is set to zero entirely (the reset to θ₀), and a
  boolean mask is fixed. From then on the forward pass uses ``ΔW ⊙ mask`` (so the gradient outside
  the mask is exactly zero, as the reference's ``grad *= mask``), and after every optimizer step
  ``on_step`` writes zero back into the entries outside the mask, so AdamW's weight decay and the
  phase-1 momentum cannot move them: every entry outside the mask equals θ₀ exactly at the end.
* Selection (``selection``): ``"global"`` (default, the reference): one ranking over all layers of
  the adapter, K_total = count × (number of layers), or round(fraction × Σ d_out·d_in), shared
  through the adapter's bank; each layer gets however many of the K_total it wins. ``"layer"``
  (ours): K per layer (``count``, or round(fraction · d_out·d_in), at least 1). Ties: exactly K
  are taken, by a stable descending sort of |ΔW| (ties go to the lower flat position, layers in
  target order), where the reference's ``>=`` threshold can take more.
* Differences from the reference, stated: the optimizer is **not** rebuilt at the switch (a
  Delta cannot see it): inside the mask, AdamW's first and second moments from phase 1 carry into
  phase 2 (the first decays with β₁ = 0.9 within tens of steps, the second with β₂ = 0.999 more
  slowly, which shrinks early phase-2 steps), and the bias correction continues from the global
  step count. The lr schedule is the trainer's single warm-up + decay over both phases, not one
  schedule per phase. The reference's ``maskable_params`` include embeddings, biases and layer
  norms; here the targets (Linear / Conv1D / Conv2d / Embedding weights) are what is sparsified.
* Resume: the mask is a buffer, and a trainer checkpoint saves only the trained parameters, so
  resuming a run from a checkpoint taken at or after the switch raises
  :class:`~paretune.errors.ParetuneError` (a checkpoint before the switch resumes normally).

**Count and storage.** Trainable per layer: d_out·d_in (what the optimizer holds for the whole
run: phase 1 trains every entry, and ΔW and its AdamW moments stay dense in memory), so
``paretune.count``'s ``trainable`` is the memory-honest number, not the paper's K. What is stored
after phase 2 is the paper's K: ``values`` (adapter precision) and ``indices`` (int32 flat positions
row·d_in + col, sorted), i.e. K·(4 + 4) bytes per layer in float32. Saved before the switch (a
phase-1 adapter), the whole dense ΔW is stored (``delta``). A load reads either form; a loaded
sparse adapter has the mask (only the file's K positions can be non-zero and train) and merges by
writing only those K entries of W (``sparse_delta``). Two LT-SFT adapters active together (or
merged) add their ΔW, the paper's composition of language and task SFTs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import Delta, add_dense
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import AdapterFileError, ConfigError, ParetuneError

DEFAULT_FRACTION = 0.01  # the reference's ft_params_proportion default (sft_args.py)


@dataclasses.dataclass
class LtSftConfig(AdapterConfig):
    """``count`` (entries per layer; with ``selection="global"`` the total is count × layers) or
    ``fraction`` (share of the entries), not both; neither means fraction = 0.01.
    ``phase1_fraction``: share of the training steps of the dense phase. ``selection``: ``"global"``
    (one ranking over all layers, the reference) or ``"layer"`` (K per layer)."""

    INIT_ONLY: ClassVar[tuple[str, ...]] = ("phase1_fraction", "selection")
    count: int | None = None
    fraction: float | None = None
    phase1_fraction: float = 0.5
    selection: str = "global"

    def validate(self) -> None:
        self._count_or_fraction()
        p = self.phase1_fraction
        self._require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1, "phase1_fraction", p,
                      "it must be in (0, 1) (the share of the steps that train every entry)")
        self._one_of("selection", ("global", "layer"))

    def entries(self, d_out: int, d_in: int) -> int:
        """K of one (d_out, d_in) layer (count, or the rounded fraction, at least 1)."""
        if self.count is not None:
            return self.count
        fraction = DEFAULT_FRACTION if self.fraction is None else self.fraction
        return max(1, int(fraction * d_out * d_in + 0.5))

    def total_entries(self, sizes: list[int]) -> int:
        """K_total of the global selection over layers with these d_out·d_in sizes."""
        if self.count is not None:
            return self.count * len(sizes)
        fraction = DEFAULT_FRACTION if self.fraction is None else self.fraction
        return max(1, int(fraction * sum(sizes) + 0.5))


def switch_step(total: int, phase1_fraction: float) -> int:
    """The optimizer step after which the mask is chosen and ΔW reset (phase 2 starts after it)."""
    return min(max(1, int(phase1_fraction * total + 0.5)), max(1, total - 1))


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the k largest scores (stable: ties go to the lower position)."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    return order[:k]


@register(
    "lt-sft",
    config=LtSftConfig,
    summary="LT-SFT: dense phase, then only the K most-changed entries of W train from W₀ (sparse K values saved)",
    formula="d_out·d_in (dense ΔW during training; K = count or fraction·d_out·d_in stored)",
)
class LtSftDelta(Delta):
    def __init__(self, geometry: Geometry, config: LtSftConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        size = self.d_out * self.d_in
        if config.selection == "layer":
            k = config.entries(self.d_out, self.d_in)
            if k > size:
                raise ConfigError(
                    f"lt-sft: count={k} exceeds the {size} entries of a ({self.d_out} x {self.d_in}) "
                    f"{self.kind} layer; use count <= {size}, or fraction."
                )
        w = geometry.weight
        self.delta = nn.Parameter(torch.zeros(self.d_out, self.d_in, dtype=adapter_dtype(w), device=w.device))
        # the phase-2 mask (None during phase 1) and its sorted int32 flat positions
        self.register_buffer("mask", None, persistent=False)
        self.register_buffer("indices", None, persistent=False)
        self._last_step = 0
        if bank is not None:
            bank.members.append(self)

    # -- bank: the global selection -----------------------------------------------------------
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: LtSftConfig) -> nn.Module | None:
        if config.selection != "global":
            return None
        sizes = [g.d_out * g.d_in for g in geometries]
        k = config.total_entries(sizes)
        if k > sum(sizes):
            raise ConfigError(f"lt-sft: {k} entries requested in all, but the {len(sizes)} targeted layers have "
                              f"{sum(sizes)}; lower count or fraction.")
        return Bank(members=[], k_total=k)

    # -- phases ------------------------------------------------------------------------------
    @property
    def sparse(self) -> bool:
        return self.mask is not None

    @torch.no_grad()
    def set_mask(self, flat: torch.Tensor) -> None:
        """Fix the phase-2 positions (flat indices into the (d_out, d_in) matrix)."""
        flat = torch.sort(torch.as_tensor(flat).flatten().long().to(self.delta.device)).values
        mask = torch.zeros(self.d_out * self.d_in, dtype=torch.bool, device=self.delta.device)
        mask[flat] = True
        self.mask = mask.view(self.d_out, self.d_in)
        self.indices = flat.to(torch.int32)

    @torch.no_grad()
    def switch(self) -> None:
        """End phase 1: choose the mask from |ΔW| (this layer, or all layers of the adapter for
        the global selection), then reset ΔW to zero (θ₀)."""
        if self.bank is None:
            self.set_mask(top_k_positions(self.delta.detach().abs(), self.config.entries(self.d_out, self.d_in)))
        else:
            members = [m for m in self.bank.members if not m.sparse]
            dev = self.delta.device
            scores = torch.cat([m.delta.detach().abs().flatten().to(dev, torch.float64) for m in members])
            chosen = top_k_positions(scores, self.bank.k_total)
            start = 0
            for m in members:
                size = m.d_out * m.d_in
                mine = chosen[(chosen >= start) & (chosen < start + size)] - start
                m.set_mask(mine)
                m.delta.zero_()
                start += size
        self.delta.zero_()

    @torch.no_grad()
    def on_step(self, step: int, total: int) -> None:
        first, self._last_step = self._last_step == 0, step
        s = switch_step(total, self.config.phase1_fraction)
        if not self.sparse:
            if first and step >= s and step > 1:
                raise ParetuneError(
                    f"lt-sft: resuming at step {step} of {total}, at or after the switch to the sparse phase "
                    f"(step {s}); the phase-2 mask is not in the checkpoint. Resume from a checkpoint before "
                    f"step {s}, or train again."
                )
            if step >= s:
                self.switch()
            return
        self.delta.masked_fill_(~self.mask, 0.0)  # undo weight decay / momentum outside the mask

    # -- the contract ------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        return self.delta * self.mask if self.sparse else self.delta

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return add_dense(self, x, base_out, self.dense())

    def delta_weight(self) -> torch.Tensor:
        return self.dense()

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.sparse:
            return None
        return self.indices, self.delta.flatten()[self.indices.long()]

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LtSftConfig) -> int:
        return d_out * d_in

    def stored_state(self) -> dict[str, torch.Tensor]:
        if not self.sparse:
            return {"delta": self.delta.detach()}
        return {"indices": self.indices, "values": self.delta.detach().flatten()[self.indices.long()]}

    def check_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        where = where or "a module"
        if set(state) == {"delta"}:
            if tuple(state["delta"].shape) != (self.d_out, self.d_in):
                raise AdapterFileError(f"{where}.delta: saved shape {tuple(state['delta'].shape)} != expected "
                                       f"{(self.d_out, self.d_in)}; the adapter was made for another base model.")
            return
        if set(state) != {"indices", "values"}:
            raise AdapterFileError(f"adapter tensors for {where} do not match lt-sft: got {sorted(state)}, expected "
                                   "['indices', 'values'] or ['delta']. Was the file written by another method?")
        flat, values = state["indices"], state["values"]
        size = self.d_out * self.d_in
        if flat.dim() != 1 or values.shape != flat.shape or flat.is_floating_point():
            raise AdapterFileError(f"{where}: saved indices {tuple(flat.shape)} and values {tuple(values.shape)} "
                                   "must be two vectors of one length (integer indices).")
        flat = flat.long()
        if flat.numel() == 0 or int(flat.min()) < 0 or int(flat.max()) >= size or bool((flat[1:] <= flat[:-1]).any()):
            raise AdapterFileError(f"{where}: saved sparse positions are empty, out of range for a "
                                   f"({self.d_out} x {self.d_in}) layer, or not sorted and unique; the file is corrupt.")

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.check_stored(state, where)
        if "delta" in state:
            self.mask = self.indices = None
            self.delta.copy_(state["delta"].to(self.delta.dtype))
            return
        self.set_mask(state["indices"])
        self.delta.zero_()
        self.delta.view(-1)[self.indices.long()] = state["values"].to(self.delta.device, self.delta.dtype)
        self._last_step = 1  # a loaded sparse adapter stays sparse if trained further

    def extra_repr(self) -> str:
        phase = f"sparse, K={self.indices.numel()}" if self.sparse else "dense (phase 1)"
        return f"{super().extra_repr()}, {phase}"
