"""FlyLoRA (Zou et al. 2025, "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via
Implicit Rank-Wise Mixture-of-Experts"; code gfyddha/FlyLoRA).

LoRA with a frozen, sparse random down projection whose own output routes the ranks, like the
fruit fly's olfactory circuit: each rank is an expert, and for every token only the k ranks with
the largest score (by default |A x| + d) take part.

    y    = A x                                  (r numbers per token; A frozen)
    mask = top-k over the r ranks of |y| + d     (1 for the k chosen ranks, else 0)
    out  = W₀x + (alpha / r) · B (y ⊙ mask)

* A ∈ R^{r×d_in} is frozen: each row has p = max(1, int(d_in · density)) non-zero entries at
  random columns (drawn without replacement), each N(0, 1)·(1/r), i.e. N(0, 1/r²); the rest are 0.
  ``density`` ρ = p / d_in defaults to k / r, so p = max(1, ⌊d_in·k / r⌋) (integer arithmetic).
  Both as the reference ``flylora.py`` (``FlyLoRALinear.__init__``: ``sparsity_ratio = k / r``,
  ``p = max(1, int(in_features * sparsity_ratio))``, ``torch.randn(p) * (1.0 / r)``; its option
  ``sparsity_ratio`` is this ``density``).
* B ∈ R^{d_out×r} trains and starts at zero, so the adapted model starts equal to the base.
  alpha defaults to 2r (the reference's ``alpha or 2.0 * r``): a scale of 2.
* d ∈ R^r is the rank-wise bias of the router. It is not trained by gradient (the top-k choice
  has none): after each optimizer step, with c_i the number of times rank i was chosen in that
  step's training forward passes (every token of every micro-batch),
  ``d_i ← d_i + u · sign(mean(c) − c_i)``: the bias of a rank chosen less than the mean rises.
  d only enters the choice; the kept values are y's (the reference's ``activated_y = y * mask``).
* ``score`` chooses what the top-k ranks: ``"abs-plus-bias"`` (default) |y| + d (the bias added
  to the magnitude, as in Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
  Mixture-of-Experts", whose update rule FlyLoRA uses: raising d_i always makes rank i likelier);
  ``"abs"`` |y + d| (``flylora.py``'s ``topk(y_biased.abs(), k)``); ``"signed"``
  y + d (the fork of PEFT that the repository's ``finetune.py`` trains with). With ``"abs"`` the
  update does not always balance: for a rank chosen more than the mean while d_i <= 0, lowering
  d_i raises |y_i + d_i| and the rank is chosen still more, so its d_i keeps falling. On a 2-layer
  BERT (hidden 32, r = 8, k = 2, u = 0.01, 60 steps; tests/methods/test_flylora.py) the
  coefficient of variation of the per-rank counts over the data went 0.90 -> 1.02 with ``"abs"``,
  0.90 -> 0.47 with ``"abs-plus-bias"`` and 1.07 -> 0.41 with ``"signed"``. The default is
  therefore ``"abs-plus-bias"``, the choice that does what the bias is for (a deliberate
  difference from ``flylora.py``, stated here).
* Defaults r = 32, k = 8 (the reference's), u = 1e-3 (the reference ``flylora.py``'s
  ``bias_lr``; its training script's fork of PEFT passes ``bias_u = 0.01``).

Choices, stated where the paper or the reference code leaves them open or differ:

* Counts. The reference ``flylora.py`` compares the counts with the constant expected frequency
  k/r (``sign(expected_frequency − assignment_count)``: +1 only for ranks never chosen); the
  rule used here compares them with their mean, as the fork's ``(ci.mean() - ci).sign()``. The fork of PEFT in the same repository
  (``peft/src/peft/tuners/lora/layer.py``) updates d after every forward pass, also in evaluation,
  and takes the top-k of y + d without the absolute value (``score="signed"`` here); here d moves
  once per optimizer step and only from forward passes in training mode (``module.train()``).
  Padding tokens are counted too (the adapter does not see the attention mask), as in both
  reference versions. Under ``torch.distributed`` the counts are summed over
  the processes before the update, so every process keeps the same d.
* The update runs in :meth:`FlyLoraDelta.on_step`, which :func:`paretune.training.train` calls
  after every optimizer step; a hand-written loop calls it itself (``delta.on_step(step, total)``
  for every FlyLoRA delta, ``step`` increasing from 1). The step last handled is remembered, so a
  repeated call for the same step changes nothing. A checkpoint of ``train`` keeps d and that
  step (through :meth:`growth_state`), so a resumed run continues as the uninterrupted one.
* Storage: A is not saved. It is regenerated from ``seed`` and the layer's index among the
  adapter's targets (a CPU ``torch.Generator`` seeded ``seed · 1_000_003 + layer``; per row a
  ``randperm`` for the columns, then ``randn`` for the values). Because it decides the adapter's
  function, ``seed`` is not an init-only option: ``paretune.hot_swap`` refuses a file made with
  another seed. A file holds B (d_out × r) and d (r) per layer, in the adapter's precision.
* ``dropout`` (default 0): dropout on the adapter's input before A, as LoRA's (the PEFT fork's
  ``lora_dropout``; ``flylora.py`` has none). It changes the routing too, as in the fork.
* Hosts: besides Linear and GPT-2 Conv1D (the paper's), an Embedding (y = A's column of each
  token id) and a Conv2d (A a convolution with r output channels, the top-k taken over the r
  channels at every position, B a 1×1 convolution), through the engine's geometry.
* Not mergeable: which ranks act depends on the input, so there is no fixed ΔW; ``merge``
  refuses. :func:`paretune.per_sample` runs each adapter on its own rows (the routing is per
  token, so rows do not interact).

Trainable per layer: d_out · r (B). A and d are buffers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import ALL_KINDS, register


SCORES = ("abs", "abs-plus-bias", "signed")  # |y + d|, |y| + d, y + d


@dataclasses.dataclass
class FlyLoraConfig(AdapterConfig):
    """``r``: ranks (experts); ``k``: ranks active per token (1 <= k <= r); ``alpha``: scale
    alpha / r (None: 2r); ``u``: the router bias's step per optimizer step; ``density``: the share
    of non-zero entries in each row of A (None: k / r); ``dropout``: on the adapter's input;
    ``seed``: A's random draw; ``score``: what the top-k ranks, "abs-plus-bias" |y| + d
    (default), "abs" |y + d| (the reference code's) or "signed" y + d."""

    r: int = 32
    k: int = 8
    alpha: float | None = None
    u: float = 1e-3
    density: float | None = None
    dropout: float = 0.0
    seed: int = 0
    score: str = "abs-plus-bias"

    def validate(self) -> None:
        self._positive_int("r")
        self._positive_int("k")
        self._require(self.k <= self.r, "k", self.k,
                      f"it is the number of ranks active per token, so at most r={self.r}; lower k or raise r")
        if self.alpha is not None:
            self._non_negative("alpha")
        self._non_negative("u")
        if self.density is not None:
            v = self.density
            self._require(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, "density", v,
                          "it is the share of non-zero entries in each row of A: a number in (0, 1]")
        self._probability("dropout")
        self._seed("seed")
        self._one_of("score", SCORES)

    @property
    def scaling(self) -> float:
        return (2.0 * self.r if self.alpha is None else float(self.alpha)) / self.r

    def nonzeros(self, d_in: int) -> int:
        """p: the non-zero entries in each row of A for a layer of input width ``d_in``."""
        if self.density is None:
            p = d_in * self.k // self.r
        else:
            p = int(d_in * self.density)
        return min(d_in, max(1, p))


def sparse_projection(r: int, d_in: int, p: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FlyLoRA's frozen A (r × d_in): in each row p entries at distinct random columns, N(0, 1)/r,
    the others zero; drawn on the CPU from a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.zeros(r, d_in, dtype=torch.float64)
    for i in range(r):
        cols = torch.randperm(d_in, generator=gen)[:p]
        a[i, cols] = torch.randn(p, generator=gen, dtype=torch.float64) / r
    return a.to(dtype)


@register(
    "flylora",
    config=FlyLoraConfig,
    summary="FlyLoRA (Zou et al. 2025): frozen sparse random A routes the ranks, top-k of |Ax + d| per token "
            "act; only B trains, d balances rank use",
    formula="r·d_out",
    kinds=ALL_KINDS,
)
class FlyLoraDelta(Delta):
    """A (r × d_in) frozen sparse random, B (d_out × r) zero, d (r) zero; see the module docstring."""

    mergeable = False

    def __init__(self, geometry: Geometry, config: FlyLoraConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        r = config.r
        self.r, self.k = r, config.k
        self.scaling = config.scaling
        self.p = config.nonzeros(self.d_in)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        a = sparse_projection(r, self.d_in, self.p, config.seed * 1_000_003 + layer, dtype)
        self.register_buffer("A", a.to(w.device), persistent=False)  # frozen, regenerated from the seed
        self.B = nn.Parameter(torch.zeros(self.d_out, r, dtype=dtype, device=w.device))
        self.register_buffer("d", torch.zeros(r, dtype=dtype, device=w.device), persistent=False)
        self.register_buffer("counts", torch.zeros(r, dtype=torch.long, device=w.device), persistent=False)
        self.last_step = 0

    # -- routing ---------------------------------------------------------------------------------
    def _rank_view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A length-r vector shaped to broadcast along ``like``'s rank dimension."""
        shape = [1] * like.dim()
        shape[self.geometry.channel_dim()] = self.r
        return t.view(shape)

    def route(self, y: torch.Tensor) -> torch.Tensor:
        """The 0/1 mask of the k ranks with the largest |y + d| at every position of ``y`` (its
        rank dimension the host's channel dimension); counts the choices in training mode."""
        dim = self.geometry.channel_dim()
        y, d = y.detach(), self._rank_view(self.d, y).to(y.dtype)
        score = self.config.score
        scores = (y + d).abs() if score == "abs" else y.abs() + d if score == "abs-plus-bias" else y + d
        chosen = scores.topk(self.k, dim=dim).indices
        if self.training:
            self.counts += torch.bincount(chosen.flatten(), minlength=self.r).to(self.counts.device)
        return torch.zeros_like(y).scatter_(dim, chosen, 1.0)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if self.kind != "embedding":  # an embedding's input is ids
            x = x.to(self.A.dtype)
            if self.drop is not None:
                x = self.drop(x)
        y = g.project_in(x, self.A)
        h = y * self.route(y)
        out = g.project_out(h, self.B.to(h.dtype))
        return base_out + (out * self.scaling).to(base_out.dtype)

    # -- the load-balancing bias --------------------------------------------------------------------
    @torch.no_grad()
    def on_step(self, step: int, total: int) -> None:
        """After optimizer step ``step``: d ← d + u·sign(mean(c) − c) with c the ranks' counts since
        the last update, then the counts restart. A step already handled changes nothing."""
        if step <= self.last_step:
            return
        self.last_step = step
        c = self.counts.to(torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(c)
        if c.sum() > 0:
            self.d.add_(self.config.u * torch.sign(c.mean() - c).to(self.d.dtype))
        self.counts.zero_()

    def growth_state(self) -> dict:
        """What a training checkpoint keeps besides B: d and the last step handled (the shapes do
        not change)."""
        return {"d": self.d.detach().cpu().clone(), "last_step": int(self.last_step)}

    @torch.no_grad()
    def grow_to(self, state: dict) -> None:
        self.d.copy_(state["d"].to(self.d.dtype))
        self.last_step = int(state["last_step"])
        self.counts.zero_()

    # -- files and counts ---------------------------------------------------------------------------
    def stored_state(self) -> dict[str, torch.Tensor]:
        """B and d (A is regenerated from the seed)."""
        return {"B": self.B.detach(), "d": self.d.detach()}

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: FlyLoraConfig) -> int:
        return d_out * config.r

    def extra_repr(self) -> str:
        return (f"flylora: d_in={self.d_in}, d_out={self.d_out}, r={self.r}, k={self.k}, p={self.p}, "
                f"scaling={self.scaling:g}")
