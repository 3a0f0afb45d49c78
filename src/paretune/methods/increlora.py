"""IncreLoRA (Zhang, Li, Wang, Zhou and Xu, 2023, "IncreLoRA: Incremental Parameter Allocation Method
for Parameter-Efficient Fine-tuning"; code FeiyuZhang98/IncreLoRA, ``loralib/loralib/increlora.py``).

    ΔW = (s / r_cur) · Σ_i b_i e_i a_iᵀ,   s = alpha

Each adapted matrix starts with ``init_r`` triplets (a, b ~ N(0, 0.02²), e = 0, so the adapter
starts at the base up to the reserve below) and grows: every ``incre_interval`` steps after
``init_warmup``, the ``top_h`` matrices of highest importance each get ``incre_rank_num`` more
triplets, until the adapter's total rank reaches its budget target_r × L (L adapted matrices).
r_cur is the matrix's current rank (init_r plus the triplets it was given), so a matrix's update
is rescaled when it grows, as in the reference (``loraW``: ``scaling / ranknum``).

Importance of a matrix (the reference's ``backward_hook`` and ``RankAllocator.update_ipt``):
S = Σ |ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW), then Ī ← β1 Ī + (1 − β1) S, Ū ← β2 Ū + (1 − β2) |S − Ī|, and
the score is Ī·Ū. Here ∂L/∂ΔW comes from a gradient hook on the dense ΔW: while the adapter can
still grow, a training forward pass applies the dense ΔW x (as the reference's ``loraW`` module
does) instead of the low-rank path, and the hook adds each backward pass's ∂L/∂ΔW into a sum; S is
taken in ``on_step`` from that sum (over gradient-accumulation micro-batches: the step's whole
gradient; the reference keeps the last backward's S) and the ΔW of the forward pass. Once growth
has stopped the forward pass is the low-rank one.

Advance learning (the reference's ``add_reserve_param(advance_learn=True)``): each matrix holds
``incre_rank_num`` reserve triplets whose a, b train from the start while their e is held at
1e-5 (a constant, not a parameter); when the matrix is chosen, the reserve becomes active (its e a
trainable parameter starting at 1e-5, as in the reference, and r_cur grows) and a new reserve is
drawn. When the budget is reached every reserve's e becomes 0 (the reference's ``param.fill_(0.)``)
and the importance hooks stop. With ``advance_learn=False`` no reserve exists and a chosen matrix
gets new a, b ~ N(0, 0.02²) with e = 0.

Choices where the reference differs or is silent:

* the reference picks the modules whose score reaches the k-th largest, k = min(top_h, ranks left),
  and gives each ``incre_rank_num`` ranks, so it may pass the budget; here h = min(top_h,
  ⌊ranks left / incre_rank_num⌋) modules (the h largest scores, ties to the earlier module) each
  get ``incre_rank_num``, so the total never exceeds the budget, and growth stops (reserves zeroed)
  when fewer than ``incre_rank_num`` ranks are left;
* steps: the trainer's ``on_step(t, T)`` after optimizer step t (1-based) is the reference's
  ``update_and_increase(global_step=t)``: the averages are updated at every step while growth is
  possible, and matrices grow at t > init_warmup with t % incre_interval == 0. The reserves exist
  from construction (the reference adds them at global step 0, before the first update);
* scaling: s / r_cur exactly (the reference adds 1e-5 to r_cur); alpha = 0 means s = init_r
  (the reference's ``lora_alpha if lora_alpha > 0 else r``);
* ``incre_rank_num=None``: the reference's table {2: 1, 4: 2, 6: 3, 8: 4} on target_r, and 1 for
  another target_r; a reserve is built only when target_r > init_r;
* orthogonality regulariser (the reference's training scripts: ``--reg_orth_coef 0.1``):
  orth_reg_weight · mean over the 2L matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F on each matrix's
  stacked A (all its rows, reserve included) and B, through :meth:`Delta.aux_loss` (the reference's
  ``compute_orth_regu`` takes each ParameterList chunk separately; we regularise the whole P and Q
  as AdaLoRA's eq. 4, which IncreLoRA's paper keeps);
* new triplets are drawn from private generators seeded by ``seed``, the layer's index and the
  chunk's index, so a run resumed from a checkpoint grows the same numbers;
* counts: per matrix at the start init_r·(d_in + d_out + 1) plus the reserve's
  incre_rank_num·(d_in + d_out); each growth of n ranks adds n·(d_in + d_out + 1).
  :meth:`IncreLoraDelta.formula_now` gives a grown matrix's count and
  :meth:`IncreLoraDelta.most_trainable` the most the whole adapter can reach (all growth on its
  widest matrix).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import add_dense
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.inject import targets_by_model_type
from ..core.lowrank import LowRankDelta
from ..core.registry import register
from ..errors import AdapterFileError
from . import svd_triplets as svd
from .adalora import ARCHITECTURES

RESERVE_E = 1e-5  # e of a reserve triplet under advance learning (the reference's value)
REFERENCE_STEP = {2: 1, 4: 2, 6: 3, 8: 4}  # the reference's incre_rank_num by target rank


def default_targets(model: nn.Module) -> list[str]:
    """Every attention and feed-forward weight matrix of a Llama-, BERT- or GPT-2-style model (the
    reference's ``query,key,value,intermediate,layer.output,attention.output``)."""
    return list(targets_by_model_type(
        model, ARCHITECTURES, "increlora",
        "Pass targets=[...] naming the attention and feed-forward projections to adapt."))


@dataclasses.dataclass
class IncreLoraConfig(AdapterConfig):
    """The reference's options (its GLUE scripts' values as defaults): ``init_r`` rank at the start,
    ``target_r`` average rank of the budget, ``alpha`` (s), ``top_h`` matrices grown per round,
    ``incre_rank_num`` ranks each (None: the reference's table), ``init_warmup`` and
    ``incre_interval`` (steps), ``advance_learn`` reserves, ``beta1`` / ``beta2`` the averages,
    ``orth_reg_weight`` the regulariser, ``seed`` for the triplets' draws."""

    init_r: int = 1
    target_r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    top_h: int = 3
    incre_rank_num: int | None = None
    init_warmup: int = 100
    incre_interval: int = 100
    advance_learn: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("init_r")
        self._positive_int("target_r")
        self._require(self.target_r >= self.init_r, "target_r", self.target_r,
                      f"the budget (target_r, the average rank at the end) must be at least init_r={self.init_r}: "
                      "IncreLoRA only adds triplets (for a falling rank use adalora)")
        self._non_negative("alpha")
        self._probability("dropout")
        self._positive_int("top_h")
        if self.incre_rank_num is not None:
            self._positive_int("incre_rank_num")
        v = self.init_warmup
        self._require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, "init_warmup", v,
                      "it must be an integer >= 0 (steps before the first growth)")
        self._positive_int("incre_interval")
        self._flag("advance_learn")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            self._require(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, name, v,
                          "it must be in (0, 1) (the weight of the moving average's past)")
        self._non_negative("orth_reg_weight")
        self._seed("seed")

    @property
    def step_ranks(self) -> int:
        """Ranks given to a chosen matrix per growth (n)."""
        if self.incre_rank_num is not None:
            return self.incre_rank_num
        return REFERENCE_STEP.get(self.target_r, 1)

    @property
    def has_reserve(self) -> bool:
        return self.advance_learn and self.target_r > self.init_r

    @property
    def s(self) -> float:
        return float(self.alpha) if self.alpha > 0 else float(self.init_r)


@register(
    "increlora",
    config=IncreLoraConfig,
    summary="IncreLoRA (Zhang et al. 2023): SVD-form ΔW = (s/r_cur)·Σ b_i e_i a_iᵀ; the most important matrices "
            "gain triplets every incre_interval steps (with pre-trained reserves) up to target_r·L",
    formula="init_r·(d_in + d_out + 1) + incre_rank_num·(d_in + d_out) at the start (reserve); "
            "+ incre_rank_num·(d_in + d_out + 1) per growth",
    kinds=("linear", "conv1d", "embedding", "conv2d"),
    default_targets=default_targets,
)
class IncreLoraDelta(LowRankDelta):
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: IncreLoraConfig) -> Bank:
        L = len(geometries)
        done = (config.target_r - config.init_r) * L < config.step_ranks  # not one growth fits the budget
        return svd.coordinator(budget=config.target_r * L, done=done)

    def __init__(self, geometry: Geometry, config: IncreLoraConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): an adapter of this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        self._dtype, self._device = adapter_dtype(w), w.device
        r = config.init_r
        self.A = nn.ParameterList([nn.Parameter(self._draw((r, self.d_in), 0, "A"))])
        self.B = nn.ParameterList([nn.Parameter(self._draw((self.d_out, r), 0, "B"))])
        self.E = nn.ParameterList([nn.Parameter(torch.zeros(r, 1, dtype=self._dtype, device=self._device))])
        n = config.step_ranks
        self.register_buffer("reserve_e", torch.full((n, 1), RESERVE_E, dtype=self._dtype, device=self._device),
                             persistent=False)
        if config.has_reserve:
            self._append_ab(n)
        if bank.done:  # no growth possible: a reserve would never be used
            self.reserve_e.zero_()
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 and self.kind != "embedding" else None
        self.ema_ipt = 0.0  # Ī and Ū of the matrix's score
        self.ema_unc = 0.0
        self._gsum: torch.Tensor | None = None  # ∂L/∂ΔW summed over this step's backward passes
        self._dw: torch.Tensor | None = None  # the ΔW those passes used
        self._aux: torch.Tensor | None = None
        svd.join(bank, self)

    # -- shapes ------------------------------------------------------------------------------
    def _draw(self, shape: tuple[int, int], chunk: int, which: str) -> torch.Tensor:
        seed = svd.layer_seed("increlora", self.config.seed, self.layer, f"{which}{chunk}")
        return svd.normal(shape, seed, self._dtype, self._device)

    def _append_ab(self, n: int) -> None:
        k = len(self.A)
        self.A.append(nn.Parameter(self._draw((n, self.d_in), k, "A")))
        self.B.append(nn.Parameter(self._draw((self.d_out, n), k, "B")))

    @property
    def reserved(self) -> bool:
        """Whether the last (a, b) chunk is a reserve (its e the constant ``reserve_e``)."""
        return len(self.A) > len(self.E)

    @property
    def rank(self) -> int:
        """r_cur: the active triplets (reserve excluded)."""
        return sum(e.shape[0] for e in self.E)

    @property
    def scaling(self) -> float:
        return self.config.s / self.rank

    @scaling.setter
    def scaling(self, value: float) -> None:  # LowRankDelta's constructor sets a placeholder
        pass

    def chunks(self) -> list[int]:
        return [a.shape[0] for a in self.A]

    @torch.no_grad()
    def grow(self) -> None:
        """Give this matrix ``incre_rank_num`` more active triplets (the reserve, then a new reserve)."""
        n = self.config.step_ranks
        if self.reserved:
            self.E.append(nn.Parameter(self.reserve_e.clone()))
            self._append_ab(n)
        else:
            self._append_ab(n)
            self.E.append(nn.Parameter(torch.zeros(n, 1, dtype=self._dtype, device=self._device)))

    # -- the update --------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        e = list(self.E) + ([self.reserve_e] if self.reserved else [])
        a = torch.cat(list(self.A)) * torch.cat(e)
        return a, torch.cat(list(self.B), dim=1)

    def _scoring(self) -> bool:
        return self.training and torch.is_grad_enabled() and not self.bank.done

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        self._build_aux()
        if not self._scoring():
            return super().forward(x, base_out)
        dw = self.delta_weight()
        if dw.requires_grad:
            self._dw = dw.detach()
            dw.register_hook(self._collect)
        if self.drop is not None:
            x = self.drop(x.to(dw.dtype))
        return add_dense(self, x, base_out, dw)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._scoring():
            return None  # the dense path of forward, for the importance hook
        out = super().fused_forward(x)
        if out is not None:
            self._build_aux()
        return out

    def _collect(self, grad: torch.Tensor) -> None:
        g = grad.detach()
        self._gsum = g.clone() if self._gsum is None else self._gsum + g

    def _build_aux(self) -> None:
        cfg = self.config
        if not (self.training and torch.is_grad_enabled()) or cfg.orth_reg_weight == 0:
            return
        a, b = torch.cat(list(self.A)), torch.cat(list(self.B), dim=1)
        self._aux = cfg.orth_reg_weight / (2 * len(self.bank.members)) * svd.orth_penalty(a, b, squared=False)

    def aux_loss(self) -> torch.Tensor | None:
        aux, self._aux = self._aux, None
        return aux

    # -- the schedule ------------------------------------------------------------------------
    def take_score(self) -> float:
        """S = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel from this step's backward passes (0 without any); clears them."""
        g, dw = self._gsum, self._dw
        self._gsum = self._dw = None
        if g is None or dw is None:
            return 0.0
        return float((dw.abs() * g.abs()).sum()) / math.sqrt(dw.numel())

    def update_importance(self, score: float) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        self.ema_ipt = b1 * self.ema_ipt + (1 - b1) * score
        self.ema_unc = b2 * self.ema_unc + (1 - b2) * abs(score - self.ema_ipt)

    def importance(self) -> float:
        return self.ema_ipt * self.ema_unc

    def on_step(self, step: int, total: int) -> None:
        """The adapter-wide growth of step ``step`` (the reference's ``update_and_increase``), run
        once per step by whichever of the adapter's deltas is called first."""
        if not svd.first_call(self.bank, step):
            return
        increase(list(self.bank.members), step)

    @torch.no_grad()
    def retire(self) -> None:
        """Growth is over: the reserve's e becomes 0 (the reference) and scoring stops."""
        self.reserve_e.zero_()
        self._gsum = self._dw = None

    def growth_state(self) -> dict:
        """Chunk sizes, active chunks, the reserve's e, the averages and the schedule's position."""
        return {"chunks": self.chunks(), "active": len(self.E), "reserve_e": float(self.reserve_e.flatten()[0]),
                "ema_ipt": self.ema_ipt, "ema_unc": self.ema_unc, "last": int(self.bank.last),
                "done": bool(self.bank.done)}

    @torch.no_grad()
    def grow_to(self, state: dict) -> None:
        """Append chunks until the shapes are those of ``state`` (values are copied afterwards)."""
        self._resize(list(state["chunks"]), int(state["active"]), append_only=True)
        self.reserve_e.fill_(float(state["reserve_e"]))
        self.ema_ipt, self.ema_unc = float(state["ema_ipt"]), float(state["ema_unc"])
        self.bank.last = max(int(self.bank.last), int(state["last"]))
        self.bank.done = bool(self.bank.done) or bool(state["done"])

    def _resize(self, chunks: list[int], active: int, append_only: bool) -> None:
        have = self.chunks()
        if have != chunks[:len(have)] or len(self.E) > active:
            if append_only:
                raise AdapterFileError(
                    f"{self.method}: saved chunk sizes {chunks} ({active} active) do not extend this adapter's "
                    f"{have} ({len(self.E)} active); was it made with other options?")
            self.A = nn.ParameterList()
            self.B = nn.ParameterList()
            self.E = nn.ParameterList()
        z = dict(dtype=self._dtype, device=self._device)
        for k in range(len(self.A), len(chunks)):
            self.A.append(nn.Parameter(torch.zeros(chunks[k], self.d_in, **z)))
            self.B.append(nn.Parameter(torch.zeros(self.d_out, chunks[k], **z)))
        for k in range(len(self.E), active):
            self.E.append(nn.Parameter(torch.zeros(chunks[k], 1, **z)))

    # -- saving ------------------------------------------------------------------------------
    def stored_state(self) -> dict[str, torch.Tensor]:
        """Every chunk's a, b and e, and the reserve's e (its a, b are the last A / B chunk)."""
        out = {n: p.detach() for n, p in self.named_parameters() if not n.startswith("bank.")}
        if self.reserved:
            out["reserve_e"] = self.reserve_e.detach()
        return out

    def _layout(self, state: dict[str, torch.Tensor], where: str) -> tuple[list[int], int]:
        """(chunk sizes, active chunks) of a saved state, checked for consistency and this layer's shape."""
        def bad(why: str) -> AdapterFileError:
            return AdapterFileError(f"increlora tensors for {where or 'a module'}: {why}. "
                                    "Was the file written by another method or version?")
        idx: dict[str, list[int]] = {"A": [], "B": [], "E": []}
        for key in state:
            m = re.fullmatch(r"([ABE])\.(\d+)", key)
            if m:
                idx[m.group(1)].append(int(m.group(2)))
            elif key != "reserve_e":
                raise bad(f"unexpected tensor {key!r}")
        k, active = len(idx["A"]), len(idx["E"])
        if not k or sorted(idx["A"]) != list(range(k)) or sorted(idx["B"]) != list(range(k)) \
                or sorted(idx["E"]) != list(range(active)) or active not in (k, k - 1):
            raise bad(f"chunks A {sorted(idx['A'])}, B {sorted(idx['B'])}, E {sorted(idx['E'])} are not consistent")
        if ("reserve_e" in state) != (active == k - 1):
            raise bad("the reserve's e and the reserve chunk must come together")
        chunks = []
        for i in range(k):
            s = state[f"A.{i}"].shape[0]
            want = {"A": (s, self.d_in), "B": (self.d_out, s), "E": (s, 1)}
            for which in ("A", "B", "E"):
                name = f"{which}.{i}"
                if name in state and tuple(state[name].shape) != want[which]:
                    raise bad(f"{name} has shape {tuple(state[name].shape)}, expected {want[which]}")
            chunks.append(s)
        if "reserve_e" in state and tuple(state["reserve_e"].shape) != (chunks[-1], 1):
            raise bad(f"reserve_e has shape {tuple(state['reserve_e'].shape)}, expected {(chunks[-1], 1)}")
        return chunks, active

    def check_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Raise :class:`AdapterFileError` unless ``state`` is a consistent (possibly grown) adapter
        for this layer's shape; changes nothing."""
        self._layout(state, where)

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Size the chunk lists as saved (a grown adapter), then copy the values in."""
        chunks, active = self._layout(state, where)
        self._resize(chunks, active, append_only=False)
        for name, p in self.named_parameters():
            if not name.startswith("bank."):
                p.copy_(state[name].to(p.dtype))
        if "reserve_e" in state:
            self.reserve_e = state["reserve_e"].to(self._dtype).to(self._device).clone()

    # -- counts ------------------------------------------------------------------------------
    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: IncreLoraConfig) -> int:
        reserve = config.step_ranks * (d_in + d_out) if config.has_reserve else 0
        return config.init_r * (d_in + d_out + 1) + reserve

    def formula_now(self) -> int:
        """The count at the current shapes: r_cur·(d_in + d_out + 1), plus the reserve's a, b."""
        d = self.d_in + self.d_out
        return self.rank * (d + 1) + (self.chunks()[-1] * d if self.reserved else 0)

    @classmethod
    def most_trainable(cls, geometries: list, config: IncreLoraConfig) -> int:
        """The most the adapter can train once grown: the start, plus every growth on its widest matrix."""
        shapes = [(g.d_out, g.d_in) for g in geometries]
        n = config.step_ranks
        start = sum(cls.trainable_formula(o, i, config) for o, i in shapes)
        growth = n * ((config.target_r - config.init_r) * len(shapes) // n)
        return start + growth * max(o + i + 1 for o, i in shapes)

    def extra_repr(self) -> str:
        return (f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, rank {self.rank}"
                f"{' + reserve ' + str(self.chunks()[-1]) if self.reserved else ''}")


@torch.no_grad()
def increase(deltas: list[IncreLoraDelta], step: int) -> None:
    """One step of the adapter-wide growth over ``deltas`` (all of one adapter)."""
    bank, cfg = deltas[0].bank, deltas[0].config
    scores = [d.take_score() for d in deltas]
    if bank.done:
        return
    n = cfg.step_ranks
    left = bank.budget - sum(d.rank for d in deltas)
    if left < n:
        finish(deltas)
        return
    for d, s in zip(deltas, scores):
        d.update_importance(s)
    if step > cfg.init_warmup and step % cfg.incre_interval == 0:
        h = min(cfg.top_h, left // n)
        order = sorted(range(len(deltas)), key=lambda i: (-deltas[i].importance(), i))
        for i in order[:h]:
            deltas[i].grow()
        if bank.budget - sum(d.rank for d in deltas) < n:
            finish(deltas)


def finish(deltas: list[IncreLoraDelta]) -> None:
    deltas[0].bank.done = True
    for d in deltas:
        d.retire()


def ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Each adapted module's current IncreLoRA rank r_cur of adapter ``name``."""
    from ..core.inject import hosts

    return {n: h.deltas[name].rank for n, h in hosts(model)
            if name in h.deltas and isinstance(h.deltas[name], IncreLoraDelta)}
