"""FourierFT (Gao, Wang, Chen, Liu, Wu, Chen & Li, ICML 2024, "Parameter-Efficient Fine-Tuning with
Discrete Fourier Transform").

ΔW = scaling · Re(IDFT2(F)), where F ∈ C^{d_out×d_in} is a spectrum that is zero except at ``n``
fixed, randomly chosen frequencies (j_k, l_k), k = 1..n, which hold the trainable real coefficients
c_k. Written out, with torch's ``ifft2`` normalisation (1 / (d_out·d_in), "backward"):

    ΔW[p, q] = scaling / (d_out·d_in) · Σ_k c_k · cos(2π (j_k·p / d_out + l_k·q / d_in)).

Trainable (and stored) per layer: ``n_frequency`` numbers, whatever the layer's shape.

Choices, following PEFT 0.21.2's ``peft/tuners/fourierft`` (``config.py``, ``layer.py``) where the
paper leaves them open; options are named as PEFT names them:

* Defaults are PEFT's: ``n_frequency=1000``, ``scaling=150.0``, ``random_loc_seed=777``,
  ``init_weights=False``.
* Frequencies: as PEFT's ``FourierFTLayer.update_layer``, the first ``n`` entries of
  ``torch.randperm(d_out·d_in, generator=torch.Generator().manual_seed(random_loc_seed))`` (CPU
  generator), read as flat positions ``row·d_in + col`` of the (d_out, d_in) spectrum, in that
  (unsorted) order: coefficient k sits at the k-th drawn position. The same seed therefore gives
  every layer of one shape the same frequencies, and gives PEFT's frequencies exactly. The
  frequencies are never saved (PEFT keeps them in a plain dict, outside its state dict): ``load``
  regenerates them from the seed. They are drawn once per distinct layer shape (in
  :meth:`FourierFTDelta.make_bank`) and shared by the layers of that shape.
* Init (``init_weights``, PEFT's option and meaning): ``False`` (the default, as PEFT and the
  authors' code, a PEFT fork) draws the coefficients from N(0, 1) (``torch.randn``, from torch's
  global generator, as PEFT), so ΔW ≠ 0 at the start; ``True`` sets them to zero (PEFT's
  ``reset_fourier_parameters``), so the adapted model starts equal to the base.
* ``n_frequency`` larger than a targeted layer's d_out·d_in is a :class:`ConfigError` (PEFT raises
  a ValueError there); there is no silent clamping. PEFT's per-layer ``n_frequency_pattern`` and
  its ``bias`` option ('all' / 'fourier_only') are not offered (no bias ever trains here).
* Kinds: Linear and GPT-2 Conv1D, PEFT's two (the (d_out, d_in) matrix view is the same as
  PEFT's ``out_features × in_features``). Embeddings and Conv2d are not offered.
* Precision: the spectrum, the inverse FFT and ΔW are in the adapter's dtype (float32, or float64
  on a float64 base); PEFT always builds a float32 spectrum. FFTs do not run in half precision,
  which is why a half-precision base still gets a float32 adapter.
* The forward pass builds the dense ΔW (a scatter of the n coefficients into a zero spectrum, then
  ``torch.fft.ifft2``) and applies it as the base op would, as PEFT's ``forward`` does. There is
  no dropout (PEFT has none) and no exact low-rank (LoRA) form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import Delta, add_dense
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError


@dataclasses.dataclass
class FourierFTConfig(AdapterConfig):
    INIT_ONLY: ClassVar[tuple[str, ...]] = ("init_weights",)
    n_frequency: int = 1000  # trainable spectral coefficients per layer (PEFT's default)
    scaling: float = 150.0  # ΔW = scaling · Re(ifft2(F)) (PEFT's default)
    random_loc_seed: int = 777  # seed of the frequency positions (PEFT's default)
    init_weights: bool = False  # False: coefficients ~ N(0, 1) (PEFT's default); True: zeros (ΔW = 0)

    def validate(self) -> None:
        self._positive_int("n_frequency")
        self._require(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
                      and math.isfinite(self.scaling), "scaling", self.scaling, "it must be a finite number")
        self._seed("random_loc_seed")
        self._flag("init_weights")


def frequency_positions(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """The n flat spectrum positions (row·d_in + col, int64, CPU) PEFT draws for a (d_out, d_in)
    layer with ``random_loc_seed=seed``: the first n of a seeded CPU ``randperm``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(d_out * d_in, generator=gen)[:n]


def check_n(n: int, d_out: int, d_in: int) -> None:
    if n > d_out * d_in:
        raise ConfigError(
            f"fourierft: n_frequency={n} is invalid for a ({d_out} x {d_in}) layer, whose spectrum has only "
            f"{d_out * d_in} entries; choose n_frequency <= {d_out * d_in} or leave that layer out of the targets."
        )


def _bank_key(d_out: int, d_in: int) -> str:
    return f"loc_{d_out}x{d_in}"


@register(
    "fourierft",
    config=FourierFTConfig,
    summary="FourierFT (Gao et al. 2024): ΔW = scaling·Re(IDFT2(F)), F zero but at n seeded random frequencies "
            "whose real coefficients train",
    formula="n_frequency",
    kinds=("linear", "conv1d"),
)
class FourierFTDelta(Delta):
    """``spectrum`` (n,) is the only parameter; the frequency positions come from the bank (one
    seeded draw per layer shape) and are never saved."""

    def __init__(self, geometry: Geometry, config: FourierFTConfig, *, bank: Bank | None = None, layer: int = 0):
        check_n(config.n_frequency, geometry.d_out, geometry.d_in)
        if bank is None:  # built alone (not through adapt): a bank for this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.scaling = float(config.scaling)
        if config.init_weights:
            start = torch.zeros(config.n_frequency, dtype=dtype, device=w.device)
        else:  # PEFT: torch.randn(n_frequency), float32, from the global generator
            start = torch.randn(config.n_frequency).to(w.device, dtype)
        self.spectrum = nn.Parameter(start)

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: FourierFTConfig) -> Bank:
        shapes = sorted({(g.d_out, g.d_in) for g in geometries})
        for d_out, d_in in shapes:  # refuse before anything is drawn
            check_n(config.n_frequency, d_out, d_in)
        device = geometries[0].weight.device
        return Bank(**{_bank_key(d_out, d_in): frequency_positions(d_out, d_in, config.n_frequency,
                                                                    config.random_loc_seed).to(device)
                       for d_out, d_in in shapes})

    def positions(self) -> torch.Tensor:
        """This layer's n flat frequency positions (row·d_in + col), in coefficient order."""
        return getattr(self.bank, _bank_key(self.d_out, self.d_in))

    def frequencies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows j_k, cols l_k) of the n frequencies, in coefficient order."""
        flat = self.positions()
        return flat // self.d_in, flat % self.d_in

    def dense(self) -> torch.Tensor:
        """ΔW = scaling · Re(ifft2(F)), (d_out, d_in), differentiable in ``spectrum``."""
        c = self.spectrum
        flat = torch.zeros(self.d_out * self.d_in, dtype=c.dtype, device=c.device)
        flat = flat.index_add(0, self.positions().to(c.device), c)  # positions are unique
        return torch.fft.ifft2(flat.view(self.d_out, self.d_in)).real * self.scaling

    # -- the contract ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return add_dense(self, x, base_out, self.dense())

    def delta_weight(self) -> torch.Tensor:
        return self.dense()

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"spectrum": self.spectrum.detach()}

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: FourierFTConfig) -> int:
        check_n(config.n_frequency, d_out, d_in)
        return config.n_frequency

    def extra_repr(self) -> str:
        return f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, n_frequency={self.spectrum.numel()}"
