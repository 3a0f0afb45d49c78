"""LaMDA and LaMDA++ (Azizi, Kundu and Pedram, EMNLP Findings 2024, "LaMDA: Large Model
Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation"; code ArminAzizi98/LaMDA).

    y = W₀x + s · B S A x,    s = alpha / r

**What the paper says.** A (PMA, r×d_in) is frozen, S (the r×r low-dimensional adapter) trains,
B (PMB, d_out×r) trains at first and "gradually freezes based on the singular values"; after tᵢ
iterations B is completely frozen and only S trains. A and B are initialised from the singular
vectors of the pre-trained weight. LaMDA++ allocates per-layer ranks from a normalised spectrum
analysis of the pre-trained weights.

**What the public code does** (commit 8ad34b4 of ArminAzizi98/LaMDA), which differs:

* init (``lamda.py`` lines 36-47, on top of PEFT's ``LoraConfig(init_lora_weights=True)``,
  ``train_clm.py`` lines 471-478): A is PEFT's LoRA A, ``kaiming_uniform_(a=√5)`` on the
  (r, d_in) weight, i.e. U(−1/√d_in, 1/√d_in), frozen (line 45); B is PEFT's zero-initialised
  LoRA B, trainable; S is a fresh ``nn.Linear(r, r, bias=False)`` with its default init
  (kaiming-uniform, a=√5: U(−1/√r, 1/√r)), applied as ``lora_B(sigma(lora_A(dropout(x))))``
  (line 27), so ΔW = s·B·S·A with S = that Linear's weight. No SVD anywhere; ΔW = 0 at the
  start because B = 0. (The code casts S to bfloat16, line 40; here S has the precision of the
  other factors.) Only ``train_clm.py`` calls ``get_lamda_model`` (line 502).
* dropout 0.1 on the adapter's input (``lora_dropout=0.1``, ``train_clm.py`` line 476, the
  ``dropout(x)`` of ``lamda.py`` line 27); scaling alpha / r (PEFT), with ``rank=64``,
  ``lora_alpha=16`` as the script defaults (``train_clm.py`` lines 174-180).
* the freezing schedule (``custom_trainer.py``: ``gradual_freeze_B`` lines 3296-3305, called
  after every backward at line 2282 with ``eta=0.3``): before optimizer step ``it`` of T (the
  micro-batch count over gradient accumulation reduces to the optimizer step), the gradient of
  B's first t = ⌊it / (0.3·T)⌋ columns is zeroed; when t ≥ r, B's ``requires_grad`` is switched
  off instead (that step's gradient is left whole). Since it ≤ T, t ≤ ⌊1/0.3⌋ = 3: with r ≥ 4 B never freezes entirely. Zeroing the gradient
  does not hold a column under AdamW (the scripts use ``weight_decay 0.1``): momentum and weight
  decay still move it. There is no LaMDA++ in the public code.

**Options here.** The defaults are the public code's behaviour; the alternatives are ours.

* ``init="reference"`` (default): A kaiming-uniform(a=√5) (bound 1/√d_in), frozen; B = 0; S
  kaiming-uniform(a=√5) (bound 1/√r), as above. A and S are drawn on the CPU in float32 from
  private ``torch.Generator`` s seeded from ``seed`` and the layer's index among the targets (the
  global RNG is untouched), so a load regenerates A exactly without storing it.
  ``init="svd"`` (ours, the paper's description): A = V_rᵀ, B = U_r (W₀ = U Σ Vᵀ, top r), with
  each singular pair's sign fixed so that the largest-magnitude entry of v is positive (u and v
  flipped together, so the sign does not depend on the LAPACK build); S = 0, so ΔW = 0 at the
  start.
* ``schedule="reference"`` (default): the t = ⌊step / (freeze_eta·T)⌋ rule above
  (``freeze_eta=0.3``), B's ``requires_grad`` off once t ≥ r. ``schedule="linear"`` (ours): the
  columns freeze evenly over the first ``freeze_fraction`` of training,
  t = ⌊r·step / (freeze_fraction·T)⌋, all r (B frozen entirely) from step freeze_fraction·T on.
  Either way B's columns freeze in index order, which for ``init="svd"`` is from the largest
  singular value down (our reading of "based on the singular values").
* Holding (ours, where the public code only zeroes gradients): a frozen column is held exactly:
  its gradient is zeroed (so it also leaves gradient clipping, as in the code) and after each
  optimizer step :meth:`LamdaDelta.on_step` (called by :func:`paretune.train`) writes back the
  values it had when it froze, undoing momentum and weight decay. ``on_step(step, T)`` sets the
  columns held during step ``step + 1``; the trainer calls it after each step (and on resume), not
  before step 1, so the first step holds no column (the rules give 0 there unless η·T ≤ 1, or
  freeze_fraction·T ≤ r for ``"linear"``).
* ``dropout`` (default 0.1, as the code) on the adapter's input, active in train mode only; the
  adapter starts in the train/eval mode of the layer it adapts.
* LaMDA++ (``rank_allocation="energy"``, ours; the paper names a normalised spectrum analysis):
  each layer's score is the share of W₀'s spectrum energy in its top r directions,
  e = Σᵢ≤r σᵢ² / Σᵢ σᵢ²; the adapter's total rank r × (number of layers) is split in proportion
  to e (rounded down, at least 1 and at most min(d_out, d_in) per layer, the rest to the layers
  furthest below their share), so layers whose weight concentrates in few directions get more.

**Saving.** B and S are saved. For ``init="reference"`` A is regenerated from the seed, and the
file holds its row sums (r numbers per layer) to check that: a torch whose generator draws other
numbers raises :class:`~paretune.errors.AdapterFileError` instead of loading a silently different
ΔW. For ``init="svd"`` A itself is saved (r·d_in numbers per layer, about doubling the file for
square layers): a recomputed SVD is defined only up to the sign of each singular pair, and up to a
rotation where singular values repeat, and its digits differ across BLAS builds and devices; B
and S trained against one A would give another ΔW against another. The canonical signs make the
init reproducible, but only the stored A makes the load exact in every case (robustness chosen
over file size).

Trainable per layer: r·d_out + r² (B and S; B's columns stop moving as they freeze).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.lowrank import LowRankDelta
from ..core.registry import register
from ..errors import AdapterFileError


@dataclasses.dataclass
class LamdaConfig(AdapterConfig):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    init: str = "reference"
    schedule: str = "reference"
    freeze_eta: float = 0.3
    freeze_fraction: float = 0.25
    rank_allocation: str = "uniform"
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("r")
        self._non_negative("alpha")
        self._probability("dropout")
        self._one_of("init", ("reference", "svd"))
        self._one_of("schedule", ("reference", "linear"))
        eta = self.freeze_eta
        self._require(isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta > 0, "freeze_eta", eta,
                      "it must be a number > 0 (the share of training steps per frozen column of B)")
        f = self.freeze_fraction
        self._require(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1, "freeze_fraction", f,
                      "it must be in [0, 1] (the share of training steps over which B is frozen)")
        self._one_of("rank_allocation", ("uniform", "energy"))
        self._seed("seed")

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        """A config saved before the reference defaults (it has no ``init``) was trained with the
        SVD init, the linear schedule and no dropout: load it so."""
        if "init" in saved:
            return saved
        return {**saved, "init": "svd", "schedule": "linear", "dropout": 0.0}


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(w.detach().to(adapter_dtype(w)), full_matrices=False)


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (column of u, row of vh) so that the largest-magnitude entry of the
    row of vh is positive."""
    idx = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, idx))
    sign[sign == 0] = 1
    return u * sign.T, vh * sign


def layer_seed(seed: int, layer: int, which: str) -> int:
    """A 63-bit seed for one layer's A or S, stable across runs and platforms."""
    digest = hashlib.sha256(f"lamda:{seed}:{layer}:{which}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def kaiming_uniform(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` (bound 1/√fan_in) from a private generator, CPU float32."""
    out = torch.empty(shape)
    return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))


def energy_ranks(spectra: list[torch.Tensor], r: int, caps: list[int]) -> list[int]:
    """LaMDA++ allocation: r × len(spectra) ranks split in proportion to each layer's share of
    energy in its top-r singular values (rounded down, then the rest to the layers furthest below
    their share; each rank in [1, its cap])."""
    scores = []
    for s in spectra:
        e = s.double() ** 2
        scores.append(float(e[:r].sum() / e.sum()) if float(e.sum()) > 0 else 1.0)
    total = r * len(spectra)
    raw = [total * sc / sum(scores) for sc in scores]
    ranks = [min(cap, max(1, math.floor(x))) for x, cap in zip(raw, caps)]
    while sum(ranks) < total:  # hand out what rounding and caps left, largest shortfall first
        room = [i for i in range(len(ranks)) if ranks[i] < caps[i]]
        if not room:
            break
        i = max(room, key=lambda j: (raw[j] - ranks[j], -j))
        ranks[i] += 1
    return ranks


@register(
    "lamda",
    config=LamdaConfig,
    summary="LaMDA (Azizi et al. 2024): ΔW = s·B·S·A, A frozen, S (r×r) trains, B's columns freeze gradually; "
            "init and schedule of the public code (or SVD init, linear schedule); LaMDA++ rank allocation",
    formula="r·d_out + r² (B's columns stop moving as they freeze)",
    kinds=("linear", "conv1d"),
    # the SVD init and LaMDA++'s energy-based ranks are computed from W: the saved tensors alone do
    # not give the adapter's ΔW on another base (the reference init draws A from the seed and does)
    base_dependent=lambda c: c.init == "svd" or c.rank_allocation == "energy",
)
class LamdaDelta(LowRankDelta):
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: LamdaConfig) -> nn.Module | None:
        if config.rank_allocation != "energy":
            return None
        spectra = [torch.linalg.svdvals(g.matrix().detach().to(adapter_dtype(g.weight))) for g in geometries]
        return Bank(ranks=energy_ranks(spectra, config.r, [min(g.d_out, g.d_in) for g in geometries]))

    def __init__(self, geometry: Geometry, config: LamdaConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        r = bank.ranks[layer] if bank is not None else min(config.r, self.d_out, self.d_in)  # LaMDA++: own rank
        if r != config.r:
            config = dataclasses.replace(config, r=r)
            self.config = config
        w = geometry.weight
        dtype, device = adapter_dtype(w), w.device
        self.scaling = config.alpha / r
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if config.init == "svd":
            u, _, vh = _svd(geometry.matrix())
            u, vh = canonical_signs(u[:, :r], vh[:r])
            a, b, s = vh, u, torch.zeros(r, r)
        else:
            a = kaiming_uniform((r, self.d_in), layer_seed(config.seed, layer, "A"))
            b = torch.zeros(self.d_out, r)
            s = kaiming_uniform((r, r), layer_seed(config.seed, layer, "S"))
        self.register_buffer("A", a.to(device, dtype).contiguous(), persistent=False)
        self.B = nn.Parameter(b.to(device, dtype).contiguous())
        self.S = nn.Parameter(s.to(device, dtype).contiguous())
        self.n_frozen = 0  # B's leading columns held during the next optimizer step
        self._held: torch.Tensor | None = None  # their values (d_out, n_frozen)
        self.B.register_hook(self._mask_grad)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.S @ self.A, self.B

    # -- the freezing schedule ---------------------------------------------------------------
    def frozen_columns(self, step: int, total: int) -> int:
        """How many of B's leading columns are held during optimizer step ``step`` (1-based) of
        ``total`` (see the module docstring)."""
        r, c = self.B.shape[1], self.config
        if c.schedule == "reference":
            return min(r, math.floor(step / (c.freeze_eta * total)))  # custom_trainer.py:3301
        t_i = c.freeze_fraction * total
        return r if step >= t_i else min(r, math.floor(r * step / t_i))

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.n_frozen:
            grad = grad.clone()
            grad[:, : self.n_frozen] = 0
        return grad

    @torch.no_grad()
    def on_step(self, step: int, total: int) -> None:
        """After optimizer step ``step`` of ``total``: put the held columns back (the optimizer's
        momentum and weight decay may have moved them), then hold the columns the schedule freezes
        for step ``step + 1`` at their present values."""
        if self._held is not None:
            self.B[:, : self._held.shape[1]] = self._held
        if step >= total:
            return
        n = self.frozen_columns(step + 1, total)
        kept = 0 if self._held is None else min(n, self._held.shape[1])
        held = self.B[:, :n].detach().clone()
        if kept:
            held[:, :kept] = self._held[:, :kept]
        self.n_frozen = n
        self._held = held if n else None
        self.B.requires_grad_(n < self.B.shape[1])

    # -- files -------------------------------------------------------------------------------
    def _a_row_sums(self) -> torch.Tensor:
        return self.A.detach().double().sum(dim=1)

    def stored_state(self) -> dict[str, torch.Tensor]:
        state = {"B": self.B.detach(), "S": self.S.detach()}
        if self.config.init == "svd":
            state["A"] = self.A.detach()
        else:
            state["A_row_sums"] = self._a_row_sums()
        return state

    def _legacy(self, state: dict[str, torch.Tensor]) -> bool:
        """A file of the SVD init saved before A was stored (it holds B and S only)."""
        return self.config.init == "svd" and set(state) == {"B", "S"}

    def check_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        if self._legacy(state):
            state = {**state, "A": self.A}
        super().check_stored(state, where)

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.check_stored(state, where)
        if self._legacy(state):
            # as that version did: A = V_rᵀ of this machine's SVD, signs as LAPACK returns them
            warnings.warn(f"{where or 'a module'}: this LaMDA adapter was saved without its A; A is recomputed "
                          "from the base's SVD, exact only where the SVD returns the signs it had when saved. "
                          "Save it again to store A.", stacklevel=2)
            self.A.copy_(_svd(self.geometry.matrix())[2][: self.A.shape[0]].to(self.A.dtype))
        if "A_row_sums" in state:
            have, want = self._a_row_sums(), state["A_row_sums"].to(torch.float64).to(self.A.device)
            gap = float((have - want).abs().max())
            if gap > 1e-6 * max(1.0, float(want.abs().max())):
                raise AdapterFileError(
                    f"{where or 'a module'}: LaMDA's frozen A, regenerated from seed {self.config.seed} for layer "
                    f"{self.layer}, differs from the A the adapter was trained with (row sums differ by {gap:.3g}); "
                    "this torch draws other random numbers than the one that saved it. Load it with that torch "
                    "version, or retrain."
                )
        if "A" in state:
            self.A.copy_(state["A"].to(self.A.dtype))
        self.B.copy_(state["B"].to(self.B.dtype))
        self.S.copy_(state["S"].to(self.S.dtype))

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LamdaConfig) -> int:
        r = min(config.r, d_out, d_in)
        return r * d_out + r * r
