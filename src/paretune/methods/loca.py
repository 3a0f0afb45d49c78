"""LoCA (Du et al., ICLR 2025, "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient
Fine-Tuning"; authors' code TL-UESTC/LoCA, ``peft/src/peft/tuners/loca/``).

    y = W₀x + ΔW x,    ΔW = scale · iDCT2(S),    S[rowᵢ, colᵢ] += aᵢ  (i = 1..n), 0 elsewhere

**What the reference does.** The authors' repository was not reachable from here; this follows a
third-party copy of their layer that states it vendors ``layer.py`` (``IdctWithIndexGrad``,
``spectrum_to_para``, the schedule in ``forward``) and ``dct_utils.py`` verbatim:

* ``spectrum``: n coefficients a, **zero init**; ``spectrum_indices``: 2×n locations
  l ∈ [0, 1], ``nn.init.uniform_(0, 1)``; rows = l₀·(d_out − 1), cols = l₁·(d_in − 1) after
  ``clamp(l, 0, 0.999)``, then ``round()`` to integers (``spectrum_to_para``).
* S is ``sparse_coo_tensor(L, a).to_dense()`` (two coefficients at one location add) and
  ΔW = C_{d_out}ᵀ S C_{d_in} with C_N the orthonormal DCT-II matrix
  (C[k, j] = √(2/N) cos(π(2j+1)k / 2N), row 0 divided by √2; ``dct_utils.py`` "default" mode);
  ``get_delta_weight`` multiplies by ``scale``.
* ``IdctWithIndexGrad.backward``: K = DCT2(∂L/∂ΔW') (ΔW' the unscaled iDCT), the coefficients'
  gradient is K[row, col]; the locations' gradient is the central finite difference
  ½·a·(K[row+1, col] − K[row−1, col]), clamped to [−1, 1] (columns alike), where a neighbour
  past the edge is replaced by the edge index itself (so at an edge the difference is one-sided
  and still halved). The chain to ``spectrum_indices`` is autograd's: ×(d − 1) and clamp's mask.
* the alternating schedule (``forward``, counted per training forward): iteration 0
  coefficients only; while iter < ``learn_location_iter``, 30-step cycles, positions 0..9
  coefficients only and 10..29 locations only (the other parameter's ``requires_grad`` off);
  from ``learn_location_iter`` on coefficients only (locations frozen). The paper's B_a = 10,
  B_l = 20 and learn_location_iter ≈ 10% of the training steps.
* GLUE (RoBERTa-base): n_frequency = 1000, scale = 1, lr of the locations 1e-4 against 5e-4 to
  1e-2 for the coefficients; query and value targeted.

**Here.**

* The transform is our own orthonormal DCT-II / DCT-III on ``torch.fft`` (Makhoul's N-point
  reordering: DCT-II_k = 2·Re(e^{−iπk/2N}·FFT(v)_k), v = (x₀, x₂, …, x₃, x₁), orthonormal
  scaling √(1/4N) for k = 0 and √(1/2N) otherwise; DCT-III by inverting those steps), the same
  matrices as the reference's C_N at O(N log N) (tested against the explicit matrix and
  ``scipy.fft.dctn``). It runs in the adapter's precision (float32, or float64 on a float64
  base) with autocast off.
* :class:`IdctWithLocationGrad` is the custom autograd Function: forward rounds the positions
  and builds S by an accumulating scatter (duplicates add, as ``to_dense`` of the COO tensor),
  backward is the reference's, exactly as above.
* Schedule: driven by :meth:`LocaDelta.on_step` (the trainer calls ``on_step(s, T)`` after
  optimizer step s, so the next step has 0-based index s): step g trains the locations only if
  0 < g < ⌊location_fraction·T⌋ and g mod (coefficient_steps + location_steps) ≥
  coefficient_steps, else the coefficients only. Defaults: coefficient_steps = 10,
  location_steps = 20, location_fraction = 0.1 (the paper's). The reference counts training
  forwards; here optimizer steps (the same without gradient accumulation). A phase is enforced
  by detaching the other parameter in the forward pass: it gets no gradient at all (``grad``
  stays None), so AdamW skips it entirely (no momentum, no weight decay): frozen exactly, as
  ``requires_grad=False`` does in the reference, while ``requires_grad`` stays on (the optimizer
  the trainer builds holds both parameters).
* Before the first ``on_step`` (a fresh adapter, or a training loop that never calls it) both
  parameters receive gradients (ours; e.g. a plain backward on a trained adapter). At the
  trainer's step 0 the coefficients are still zero, so the locations' gradient ½·a·(…) is
  identically zero: it is then returned as None rather than zeros, so that step 0 leaves the
  locations and their optimizer state untouched, as the reference's "coefficients only" does.
* ``location_lr_ratio`` ρ (ours, default 1.0): the trainer has one learning rate for the adapter,
  while the reference trains the locations at their own (1e-4, i.e. 0.01 to 0.2 of the
  coefficients' rate on GLUE). The parameter ``locations`` holds u and the location is l = ρ·u
  (u drawn as U(0, 1)/ρ): under Adam(W) a step moves u by about lr, so l moves by about ρ·lr,
  exactly as a separate parameter group at ρ·lr would (AdamW's update, weight decay included, is
  proportional to the group's lr). ρ = 1: u is the reference's ``spectrum_indices``.
* Locations are drawn on the CPU in float32 from a private ``torch.Generator`` seeded from
  ``seed`` and the layer's index among the targets (the reference uses the global RNG).
* ``dropout`` (default 0.0, the copy's default) on the adapter's input, train mode only.
* ``n_frequency`` larger than d_out·d_in is refused (ConfigError); locations may still coincide
  (the reference does not prevent it; their coefficients then add).
* Host kinds: Linear and GPT-2 Conv1D (the reference adapts Linear layers; a 2-D spectrum of a
  conv kernel flattened to (out, in·kh·kw) or of an embedding table is not what the paper studies).

**Counting.** The paper reports the n coefficients per layer; the 2n locations are trained too
(during the first location_fraction of training) and are saved, so here a layer counts
**3·n** trainable numbers (n coefficients + 2n locations). Saved: ``coefficients`` (n) and
``locations`` (2, n) (the raw u, see ρ above), so a load is exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta, add_dense
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError

CLIP = 0.999  # spectrum_to_para: clamp(l, 0, 0.999) before scaling to (d - 1)


@dataclasses.dataclass
class LocaConfig(AdapterConfig):
    INIT_ONLY = ("seed",)

    n_frequency: int = 1000
    scale: float = 1.0
    dropout: float = 0.0
    location_fraction: float = 0.1
    coefficient_steps: int = 10
    location_steps: int = 20
    location_lr_ratio: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("n_frequency")
        s = self.scale
        self._require(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s), "scale", s,
                      "it must be a finite number")
        self._probability("dropout")
        f = self.location_fraction
        self._require(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1, "location_fraction", f,
                      "it must be in [0, 1] (the share of training steps during which locations may learn)")
        self._positive_int("coefficient_steps")
        self._positive_int("location_steps")
        rho = self.location_lr_ratio
        self._require(isinstance(rho, (int, float)) and not isinstance(rho, bool) and 0 < rho < math.inf,
                      "location_lr_ratio", rho, "it must be a number > 0 (the locations' lr over the coefficients')")
        self._seed("seed")


# -- the orthonormal DCT on torch.fft ------------------------------------------------------------

def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension (scipy's ``dct(x, norm="ortho")``)."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    y = 2 * (torch.fft.fft(v, dim=-1) * twiddle).real
    norm = torch.full((n,), math.sqrt(1 / (2 * n)), device=x.device, dtype=x.dtype)
    norm[0] = math.sqrt(1 / (4 * n))
    return y * norm


def idct(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-III along the last dimension: the inverse of :func:`dct`."""
    n = y.shape[-1]
    norm = torch.full((n,), math.sqrt(2 * n), device=y.device, dtype=y.dtype)
    norm[0] = math.sqrt(4 * n)
    y = y * norm  # back to the unnormalised DCT-II values
    mirrored = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)  # y_{N-k}, y_N = 0
    k = torch.arange(n, device=y.device, dtype=y.dtype)
    twiddle = torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(torch.complex(y, -mirrored) * twiddle / 2, dim=-1).real
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def dct2(m: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II of a matrix: C_M m C_Nᵀ."""
    with _no_autocast(m):
        return dct(dct(m).transpose(-1, -2)).transpose(-1, -2)


def idct2(m: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal inverse DCT of a matrix: C_Mᵀ m C_N."""
    with _no_autocast(m):
        return idct(idct(m).transpose(-1, -2)).transpose(-1, -2)


def spectrum(coefficients: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The dense (d_out, d_in) spectrum S with the coefficients at (rows, cols), duplicates added."""
    s = torch.zeros(d_out, d_in, dtype=coefficients.dtype, device=coefficients.device)
    return s.index_put_((rows, cols), coefficients, accumulate=True)


class IdctWithLocationGrad(torch.autograd.Function):
    """iDCT2 of a sparse spectrum with gradients for its coefficients and its (rounded) locations.

    ``forward(coefficients (n,), positions (2, n) in index units, d_out, d_in, drop_zero)``:
    positions are rounded to the integer locations. ``backward``: K = DCT2(grad); the
    coefficients get K[row, col], the positions ½·a·(K[next] − K[previous]) clamped to [−1, 1]
    per axis (neighbours past an edge replaced by the edge), as the reference's
    ``IdctWithIndexGrad``. ``drop_zero``: return None for an identically zero location gradient
    (all coefficients zero), so an optimizer skips the locations.
    """

    @staticmethod
    def forward(ctx, coefficients, positions, d_out: int, d_in: int, drop_zero: bool = False):
        idx = positions.detach().round().long()
        rows, cols = idx[0], idx[1]
        ctx.save_for_backward(coefficients.detach(), rows, cols)
        ctx.shape = (d_out, d_in)
        ctx.zero_coefficients = bool(drop_zero and ctx.needs_input_grad[1] and not bool(coefficients.any()))
        return idct2(spectrum(coefficients.detach(), rows, cols, d_out, d_in))

    @staticmethod
    def backward(ctx, grad):
        coefficients, rows, cols = ctx.saved_tensors
        d_out, d_in = ctx.shape
        k = dct2(grad.to(coefficients.dtype))
        grad_coef = k[rows, cols] if ctx.needs_input_grad[0] else None
        grad_pos = None
        if ctx.needs_input_grad[1] and not ctx.zero_coefficients:
            up, down = (rows + 1).clamp(max=d_out - 1), (rows - 1).clamp(min=0)
            right, left = (cols + 1).clamp(max=d_in - 1), (cols - 1).clamp(min=0)
            g_row = (0.5 * coefficients * (k[up, cols] - k[down, cols])).clamp(-1, 1)
            g_col = (0.5 * coefficients * (k[rows, right] - k[rows, left])).clamp(-1, 1)
            grad_pos = torch.stack([g_row, g_col])
        return grad_coef, grad_pos, None, None, None


def layer_seed(seed: int, layer: int) -> int:
    """A 63-bit seed for one layer's locations, stable across runs and platforms."""
    digest = hashlib.sha256(f"loca:{seed}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def phase_of(step: int, total: int, config: LocaConfig) -> str:
    """What optimizer step ``step`` (0-based) of ``total`` trains: "coefficients" or "locations"
    (the reference's schedule with B_a = coefficient_steps, B_l = location_steps and
    learn_location_iter = ⌊location_fraction·total⌋)."""
    until = math.floor(config.location_fraction * total)
    cycle = config.coefficient_steps + config.location_steps
    if 0 < step < until and step % cycle >= config.coefficient_steps:
        return "locations"
    return "coefficients"


def _check_size(n: int, d_out: int, d_in: int) -> None:
    if n > d_out * d_in:
        raise ConfigError(f"loca: n_frequency={n} is larger than the {d_out * d_in} entries of a "
                          f"({d_out} x {d_in}) layer; choose n_frequency <= {d_out * d_in}.")


@register(
    "loca",
    config=LocaConfig,
    summary="LoCA (Du et al., ICLR 2025): ΔW = scale·iDCT2(S), S sparse with n learnable coefficients at "
            "learnable locations (finite-difference location gradients, alternating schedule)",
    formula="3·n_frequency (n coefficients + 2n locations; the paper counts the n coefficients)",
    kinds=("linear", "conv1d"),
)
class LocaDelta(Delta):
    def __init__(self, geometry: Geometry, config: LocaConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        n = config.n_frequency
        _check_size(n, self.d_out, self.d_in)
        w = geometry.weight
        dtype, device = adapter_dtype(w), w.device
        self.scaling = float(config.scale)
        self.ratio = float(config.location_lr_ratio)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        g = torch.Generator().manual_seed(layer_seed(config.seed, layer))
        u = torch.rand(2, n, generator=g) / self.ratio  # l = ρ·u ~ U(0, 1), as nn.init.uniform_(0, 1)
        self.coefficients = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.locations = nn.Parameter(u.to(device, dtype))
        self.phase: str | None = None  # None: before the first on_step, both train

    # -- the schedule --------------------------------------------------------------------------
    def on_step(self, step: int, total: int) -> None:
        """After optimizer step ``step`` of ``total``: set what step ``step`` (0-based: the next
        one) trains."""
        self.phase = phase_of(step, total, self.config)

    # -- ΔW ------------------------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """The locations in index units, (2, n): clamp(ρ·u, 0, 0.999)·(d − 1), not yet rounded."""
        clipped = (self.ratio * self.locations).clamp(0, CLIP)
        return torch.stack([clipped[0] * (self.d_out - 1), clipped[1] * (self.d_in - 1)])

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer (rows, cols) the coefficients sit at."""
        idx = self.positions().detach().round().long()
        return idx[0], idx[1]

    def dense(self) -> torch.Tensor:
        coefficients, positions = self.coefficients, self.positions()
        if self.phase == "coefficients":
            positions = positions.detach()
        elif self.phase == "locations":
            coefficients = coefficients.detach()
        out = IdctWithLocationGrad.apply(coefficients, positions, self.d_out, self.d_in, self.phase is None)
        return out * self.scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw = self.dense()
        x = x.to(dw.dtype)
        if self.drop is not None:
            x = self.drop(x)
        return add_dense(self, x, base_out, dw)

    def delta_weight(self) -> torch.Tensor:
        return self.dense()

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LocaConfig) -> int:
        _check_size(config.n_frequency, d_out, d_in)
        return 3 * config.n_frequency

    def extra_repr(self) -> str:
        return f"loca: d_in={self.d_in}, d_out={self.d_out}, n={self.coefficients.numel()}, phase={self.phase}"
