"""AdaLoRA (Zhang, Chen, Bukharin, He, Cheng, Chen and Zhao, ICLR 2023, "Adaptive Budget Allocation
for Parameter-Efficient Fine-Tuning"; code QingruZhang/AdaLoRA, and PEFT's ``tuners/adalora``).

    ΔW = s · B · diag(E) · A,   s = alpha / (init_r + 1e-5)

Every adapted matrix starts with ``init_r`` triplets (A rows, E entries, B columns; E = 0, A and B
N(0, 0.02²), see :mod:`paretune.methods.svd_triplets`). During training a global rank budget falls
from init_r × L (L adapted matrices) to target_r × L on PEFT's cubic schedule, and the triplets of
lowest importance across *all* the adapter's matrices have their singular value e_i set to zero.
An orthogonality regulariser keeps A's rows and B's columns near orthonormal.

As PEFT (``tuners/adalora/layer.py`` and ``model.py``, version 0.21.2), which follows the authors'
``loralib/adalora.py``:

* scaling ``alpha / (ranknum + 1e-5)`` with ranknum = init_r, fixed (masking does not change it);
  alpha = 0 means scaling by init_r (PEFT's ``lora_alpha if lora_alpha > 0 else r``);
* importance of triplet i: s(e_i) + mean_j s(A_ij) + mean_j s(B_ji), s = Ī·Ū with Ī, Ū the moving
  averages (β1, β2) of |θ·∇θ| and of its deviation (``RankAllocator.update_ipt``);
* schedule (``RankAllocator.budget_schedule``) at step t of T = ``total_step`` (default: the
  trainer's number of steps): budget init_r·L for t ≤ tinit; target_r·L for t > T − tfinal;
  between them ⌊(init_r·L − target_r·L)(1 − (t − tinit)/(T − tfinal − tinit))³ + target_r·L⌋,
  with masking every ``deltaT`` steps. Masking: the threshold is the (init_r·L − budget)-th
  smallest triplet score over all matrices, and every triplet scoring at or below it gets e_i = 0.
  The importance averages are updated at every step t < T − tfinal; at t = T − tfinal the final
  mask is taken (without an update) and then reapplied after every later step (the masked e_i
  otherwise move again under the optimizer, as in PEFT and the authors' code);
* ``on_step(t, T)`` of the trainer runs after the optimizer step of step t (1-based), with the
  gradients still on the parameters: PEFT's ``update_and_allocate(global_step=t)``;
* the regulariser (``orth="reference"``, default): orth_reg_weight · mean over the 2L matrices
  of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (not squared, as PEFT's ``AdaLoraModel.forward`` and the
  authors' ``compute_orth_regu``); ``orth="paper"``: orth_reg_weight · Σ over matrices of
  ‖A Aᵀ − I‖²_F + ‖Bᵀ B − I‖²_F (eq. 4). It reaches the trainer through :meth:`Delta.aux_loss`
  (each matrix adds its share), built only in training mode with gradients on.

Choices where the paper and PEFT are silent or do not apply:

* ``target_r`` defaults to ⌊2·init_r/3⌋ (at least 1), the ratio of PEFT's defaults 12 → 8, so
  that a different init_r keeps a valid target;
* the adapter-wide allocation runs once per step, through the bank shared by the adapter's deltas
  (:func:`paretune.methods.svd_triplets.coordinator`): the first delta called for a step does it
  for all; the importance averages and the mask live on each delta (non-persistent buffers) and
  go into training checkpoints through :meth:`AdaLoraDelta.growth_state`, so a resumed run masks
  as an uninterrupted one;
* a schedule without a budgeting phase (tinit ≥ T − tfinal) is refused with a ConfigError when
  T is known: at construction when ``total_step`` is given, else at the first step;
* the masked triplets stay parameters (PEFT does not resize either); the trainable count is
  init_r·(d_in + d_out + 1) per matrix, the paper's count at the start. :func:`effective_ranks`
  gives each matrix's current number of unmasked triplets.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.inject import hosts, targets_by_model_type
from ..core.lowrank import LowRankDelta
from ..core.registry import register
from ..errors import ConfigError
from . import svd_triplets as svd

# every weight matrix of attention and feed-forward, as the paper adapts (W_q, W_k, W_v, W_o, W_f1, W_f2)
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    **{t: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    **{t: ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
       for t in ("bert", "roberta")},
    "gpt2": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}


def default_targets(model: nn.Module) -> list[str]:
    """Every attention and feed-forward weight matrix of a Llama-, BERT- or GPT-2-style model."""
    targets = targets_by_model_type(
        model, ARCHITECTURES, "adalora",
        "Pass targets=[...] naming the attention and feed-forward projections to adapt.")
    return list(targets)


@dataclasses.dataclass
class AdaLoraConfig(AdapterConfig):
    """PEFT's names and defaults: ``init_r`` triplets per matrix at the start, ``target_r`` the
    average at the end (None: ⌊2·init_r/3⌋); ``tinit`` / ``tfinal`` steps before / after the
    budget falls; ``deltaT`` steps between maskings; ``beta1`` / ``beta2`` the importance
    averages; ``orth_reg_weight`` and ``orth`` ("reference" or "paper") the regulariser;
    ``total_step``: T of the schedule (None: the trainer's number of steps)."""

    init_r: int = 12
    target_r: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    orth: str = "reference"
    total_step: int | None = None

    def validate(self) -> None:
        self._positive_int("init_r")
        if self.target_r is None:
            self.target_r = max(1, (2 * self.init_r) // 3)
        self._positive_int("target_r")
        self._require(self.target_r <= self.init_r, "target_r", self.target_r,
                      f"it must be at most init_r={self.init_r} (AdaLoRA only removes triplets; "
                      "for a growing rank use increlora)")
        self._non_negative("alpha")
        self._probability("dropout")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            self._require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, v,
                          "it must be an integer >= 0 (a number of steps)")
        self._positive_int("deltaT")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            self._require(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, name, v,
                          "it must be in (0, 1) (the weight of the moving average's past)")
        self._non_negative("orth_reg_weight")
        self._one_of("orth", ("reference", "paper"))
        if self.total_step is not None:
            self._positive_int("total_step")
            check_schedule(self, self.total_step)


def check_schedule(config: AdaLoraConfig, total: int) -> None:
    """ConfigError unless the schedule leaves steps for the budget to fall (tinit < T − tfinal)."""
    if config.tinit >= total - config.tfinal:
        raise ConfigError(
            f"adalora: tinit={config.tinit} and tfinal={config.tfinal} leave no budgeting phase in {total} training "
            f"steps (tinit must be < total_step − tfinal); lower tinit / tfinal or train for more steps."
        )


def budget_schedule(step: int, total: int, init_budget: int, target_budget: int,
                    config: AdaLoraConfig) -> tuple[int, bool]:
    """(budget, mask now?) at step ``step`` of ``total`` (PEFT's ``RankAllocator.budget_schedule``)."""
    if step <= config.tinit:
        return init_budget, False
    if step > total - config.tfinal:
        return target_budget, True
    mul = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((init_budget - target_budget) * (mul ** 3) + target_budget), step % config.deltaT == 0


@register(
    "adalora",
    config=AdaLoraConfig,
    summary="AdaLoRA (Zhang et al. 2023): SVD-form ΔW = s·B·diag(E)·A; the least important triplets across "
            "all layers are masked as a cubic schedule lowers the rank budget from init_r to target_r",
    formula="init_r·(d_in + d_out + 1)",
    kinds=("linear", "conv1d", "embedding", "conv2d"),
    default_targets=default_targets,
)
class AdaLoraDelta(LowRankDelta):
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: AdaLoraConfig) -> Bank:
        return svd.coordinator()

    def __init__(self, geometry: Geometry, config: AdaLoraConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): an adapter of this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype, device, r = adapter_dtype(w), w.device, config.init_r
        self.A = nn.Parameter(torch.randn(r, self.d_in, dtype=dtype, device=device) * svd.INIT_STD)
        self.E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.randn(self.d_out, r, dtype=dtype, device=device) * svd.INIT_STD)
        self.scaling = (config.alpha if config.alpha > 0 else float(r)) / (r + 1e-5)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 and self.kind != "embedding" else None
        for name in ("A", "E", "B"):  # Ī and Ū of every entry (not saved with the adapter)
            p = getattr(self, name)
            self.register_buffer(f"ipt_{name}", torch.zeros_like(p, dtype=torch.float32), persistent=False)
            self.register_buffer(f"unc_{name}", torch.zeros_like(p, dtype=torch.float32), persistent=False)
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=device), persistent=False)
        self._aux: torch.Tensor | None = None
        svd.join(bank, self)

    # -- the update ------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A * self.E, self.B

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        self._build_aux()
        return super().forward(x, base_out)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        out = super().fused_forward(x)
        if out is not None:
            self._build_aux()
        return out

    def _build_aux(self) -> None:
        cfg = self.config
        if not (self.training and torch.is_grad_enabled()) or cfg.orth_reg_weight == 0:
            return
        squared = cfg.orth == "paper"
        pen = svd.orth_penalty(self.A, self.B, squared)
        share = 1.0 if squared else 1.0 / (2 * len(self.bank.members))
        self._aux = cfg.orth_reg_weight * share * pen

    def aux_loss(self) -> torch.Tensor | None:
        aux, self._aux = self._aux, None
        return aux

    # -- the budget ------------------------------------------------------------------------
    def triplet_scores(self) -> torch.Tensor:
        """Current importance of each triplet (init_r,) from the moving averages."""
        return svd.triplet_scores(self.ipt_E * self.unc_E, self.ipt_A * self.unc_A, self.ipt_B * self.unc_B)

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name in ("A", "E", "B"):
            p = getattr(self, name)
            svd.update_importance(p.detach().float(), None if p.grad is None else p.grad.float(),
                                  getattr(self, f"ipt_{name}"), getattr(self, f"unc_{name}"), b1, b2)

    @torch.no_grad()
    def reset_importance(self) -> None:
        for name in ("A", "E", "B"):
            getattr(self, f"ipt_{name}").zero_()
            getattr(self, f"unc_{name}").zero_()

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.E.masked_fill_(~self.mask.view(-1, 1), 0.0)

    def on_step(self, step: int, total: int) -> None:
        """The adapter-wide allocation of step ``step`` (PEFT's ``update_and_allocate``), run once
        per step by whichever of the adapter's deltas is called first."""
        if not svd.first_call(self.bank, step):
            return
        allocate([d for d in self.bank.members], step, total)

    def growth_state(self) -> dict:
        """The importance averages, the mask and the last step handled: what a checkpoint needs so
        that a resumed run allocates as an uninterrupted one (the shapes never change)."""
        state = {f"{k}_{n}": getattr(self, f"{k}_{n}").detach().cpu().clone() for k in ("ipt", "unc") for n in "AEB"}
        state["mask"] = self.mask.detach().cpu().clone()
        state["last"] = int(self.bank.last)
        return state

    @torch.no_grad()
    def grow_to(self, state: dict) -> None:
        for key, value in state.items():
            if key != "last":
                getattr(self, key).copy_(value)
        self.bank.last = max(int(self.bank.last), int(state["last"]))

    def effective_rank(self) -> int:
        """Triplets not masked (those whose e_i the allocation keeps)."""
        return int(self.mask.sum())

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: AdaLoraConfig) -> int:
        return config.init_r * (d_in + d_out + 1)

    def extra_repr(self) -> str:
        return f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, rank {self.effective_rank()}/{self.config.init_r}"


@torch.no_grad()
def allocate(deltas: list[AdaLoraDelta], step: int, total: int) -> None:
    """One step of the adapter-wide rank allocation over ``deltas`` (all of one adapter)."""
    config = deltas[0].config
    T = config.total_step or total
    check_schedule(config, T)
    init_budget = sum(d.config.init_r for d in deltas)
    target_budget = config.target_r * len(deltas)
    final = T - config.tfinal
    if step < final:
        for d in deltas:
            d.update_importance()
        budget, now = budget_schedule(step, T, init_budget, target_budget, config)
        if now:
            mask_to_budget(deltas, init_budget - budget)
    elif step == final:
        mask_to_budget(deltas, init_budget - target_budget)
        for d in deltas:
            d.reset_importance()
    else:
        for d in deltas:
            d.apply_mask()


def mask_to_budget(deltas: list[AdaLoraDelta], k: int) -> None:
    """Zero e_i of every triplet scoring at or below the k-th smallest score of the adapter (PEFT's
    ``mask_to_budget``); k ≤ 0 masks nothing."""
    if k <= 0:
        return
    scores = [d.triplet_scores() for d in deltas]
    threshold = torch.kthvalue(torch.cat([s.to(scores[0].device) for s in scores]), k)[0].item()
    for d, s in zip(deltas, scores):
        d.mask.copy_(s > threshold)
        d.apply_mask()


def effective_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Each adapted module's current AdaLoRA rank (unmasked triplets) of adapter ``name``."""
    out = {}
    for host_name, host in hosts(model):
        delta = host.deltas[name] if name in host.deltas else None
        if isinstance(delta, AdaLoraDelta):
            out[host_name] = delta.effective_rank()
    return out
