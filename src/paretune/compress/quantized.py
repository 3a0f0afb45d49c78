"""Round-to-nearest (RTN) k-bit weights with groups along either channel dimension, packed codes,
and :class:`QuantizedLinear`, the layer that serves them.

The scheme
----------
A weight W of shape (out, in) is cut into groups of ``group_size`` contiguous entries:

* ``axis="out"`` (the usual grouping): groups run along the input dimension inside each output row,
  ``W[o, j·g : (j+1)·g]``: each output channel has in/g groups;
* ``axis="in"`` (the per-input-channel grouping of Heo et al. 2024, "Rethinking Channel
  Dimensions to Isolate Outliers for Low-bit Weight Quantization of Large Language Models",
  AdaDim): groups run along the output dimension inside each input column,
  ``W[j·g : (j+1)·g, i]``: each input channel has out/g groups, so an input channel whose
  activations carry outliers (and whose weights are scaled accordingly) gets its own ranges.

``group_size=None`` makes one group of each whole row (``axis="out"``) or column (``axis="in"``).
A group size that does not divide that length is refused, not padded (padding would add stored
codes and a short edge group whose range differs from the others).

Each group x gets an asymmetric min/max quantiser with a scale s and a zero point z (the group's
minimum, a float-domain zero point as in tinygemm / HQQ, so that the grid starts at the group's
minimum and the bound below holds at both ends; an integer zero point would clip the maximum):

    s = (max x − z) / (2^k − 1),   z = min x,
    q = clamp(round((x − z) / s), 0, 2^k − 1),   x̂ = q·s + z.

s and z are stored in float16. To keep the error bound after that rounding, z is rounded to the
float16 at or below min x and s to the float16 at or above (max x − z)/(2^k − 1) (one step of
``nextafter`` where round-to-nearest went the wrong way), so the grid z, z+s, …, z+(2^k−1)·s covers
[min x, max x] and every entry satisfies ``|x − x̂| ≤ s/2`` (plus float32 rounding of the
dequantisation, a few ulps of max |x|). A constant group has s = 0 only when its value is exactly a
float16; then every code is 0 and x̂ = x. Weights beyond the float16 range (|w| > 65504) or not
finite are refused.

Packing
-------
The codes, in the group-major order of the grouped matrix (W for ``axis="out"``, Wᵀ for
``axis="in"``, row by row), are packed into ``uint8`` bytes, little-end first:

* 8 bits: one code per byte;
* 4 and 2 bits: 8/k codes per byte, code i of a byte at bits (i mod 8/k)·k;
* 3 bits: 8 codes into 3 bytes, a 24-bit little-endian word with code i at bits 3i..3i+2.

The last byte (or 3-byte word) is padded with zero codes, so the packed size is
``ceil(n / c)·b`` bytes for n codes with (c, b) = (4, 1), (8, 3), (2, 1), (1, 1) for 2, 3, 4, 8 bits:
exactly n·k/8 when n is a multiple of 8 (every layer of a real model). Scales and zeros add
2·2 bytes per group (float16), a bias stays in the layer's dtype.

Why not torchao
---------------
torchao 0.18 resolves against this torch and its ``IntxWeightOnlyConfig`` (weight_dtype
torch.int2 … torch.int8, ``PerGroup(g)``, ``MappingType.ASYMMETRIC``) would give CPU weight-only
group RTN for every width here; but its groups run only along the input dimension of each output
row (no per-input-channel grouping), its CPU packing format stores one code per int8 byte, and it
would be a large dependency for a few tensor operations. This module therefore packs its own codes;
its grid is torchao's asymmetric min/max grid with a float zero point.

Serving dequantises the whole weight on every call (unpack, multiply, add, cast), then runs a plain
``F.linear``: memory is saved, not time; on a CPU a quantised model runs slower than its float
original.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ParetuneError

BITS = (2, 3, 4, 8)
AXES = ("out", "in")
Axis = Literal["out", "in"]
FP16_MAX = 65504.0
# (codes, bytes) per packing unit for each width
_UNIT = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


# -- checks ---------------------------------------------------------------------------------------
def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not offered; choose one of {', '.join(map(str, BITS))}.")


def check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ConfigError(f"axis={axis!r} is not understood; use 'out' (groups along each output row, the usual) "
                          "or 'in' (groups along each input column, AdaDim's per-input-channel grouping).")


def check_group_size(group_size: int | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size={group_size!r} must be a positive integer (or None for one group per "
                          "whole channel).")


def group_length(out_features: int, in_features: int, axis: str) -> int:
    """The length a group runs along: in_features for ``axis="out"``, out_features for ``"in"``."""
    return in_features if axis == "out" else out_features


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` packed k-bit codes (module docstring: ceil(n / c)·b)."""
    c, b = _UNIT[bits]
    return math.ceil(numel / c) * b


# -- packing --------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values in [0, 2^k)) -> packed uint8 bytes (module docstring's layout)."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    c, _ = _UNIT[bits]
    pad = (-flat.numel()) % c
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(c, dtype=torch.int32, device=flat.device) * bits
    words = (flat.view(-1, c) << shifts).sum(1, dtype=torch.int32)
    if bits == 3:  # a 24-bit word as 3 little-endian bytes
        byte_shifts = torch.tensor([0, 8, 16], dtype=torch.int32, device=flat.device)
        return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return words.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack`: the first ``numel`` codes, as uint8."""
    check_bits(bits)
    if bits == 8:
        return packed[:numel]
    if bits == 3:
        b = packed.view(-1, 3).to(torch.int32)
        words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 3
        return ((words[:, None] >> shifts) & 0x7).to(torch.uint8).reshape(-1)[:numel]
    c = 8 // bits
    shifts = torch.arange(c, dtype=torch.uint8, device=packed.device) * bits
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]


# -- round to nearest -----------------------------------------------------------------------------
def _grouped(w: torch.Tensor, group_size: int | None, axis: str) -> torch.Tensor:
    """W (out, in) as (rows, groups, g): rows are output rows (axis "out") or input columns ("in")."""
    m = w if axis == "out" else w.T
    g = m.shape[1] if group_size is None else group_size
    if m.shape[1] % g:
        raise ConfigError(
            f"group_size={group_size} does not divide the grouped length {m.shape[1]} of a ({w.shape[0]}, "
            f"{w.shape[1]}) weight with axis={axis!r}; choose a divisor of {m.shape[1]} (groups are not padded)."
        )
    return m.reshape(m.shape[0], m.shape[1] // g, g)


def _fp16_at_or_below(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    over = h.float() > x
    return torch.where(over, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _fp16_at_or_above(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    under = h.float() < x
    return torch.where(under, torch.nextafter(h, torch.full_like(h, math.inf)), h)


@torch.no_grad()
def rtn(w: torch.Tensor, bits: int, group_size: int | None, axis: Axis = "out"
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest k-bit group quantisation of a (out, in) weight (module docstring).

    Returns ``(codes, scales, zeros)``: codes uint8 (rows, in_groups·g) in the grouped layout (rows
    = output rows for ``axis="out"``, input columns for ``axis="in"``), scales and zeros float16
    (rows, groups). Raises ConfigError for a group size that does not divide the grouped length,
    ParetuneError for weights that are not finite or beyond the float16 range."""
    check_bits(bits)
    check_axis(axis)
    check_group_size(group_size)
    if w.dim() != 2:
        raise ParetuneError(f"rtn expects a (out, in) weight matrix, got shape {tuple(w.shape)}.")
    x = _grouped(w.detach().float(), group_size, axis)
    if not bool(torch.isfinite(x).all()):
        raise ParetuneError("the weight has non-finite entries (inf or nan); it cannot be quantised. Check the model.")
    if float(x.abs().max()) > FP16_MAX:
        raise ParetuneError(f"the weight has entries beyond the float16 range ({FP16_MAX:g}); its scales and zeros "
                            "cannot be stored in float16. Leave this layer out of targets.")
    levels = (1 << bits) - 1
    z16 = _fp16_at_or_below(x.amin(-1))
    s16 = _fp16_at_or_above((x.amax(-1) - z16.float()) / levels)
    z, s = z16.float()[..., None], s16.float()[..., None]
    q = torch.where(s > 0, torch.round((x - z) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, levels)
    codes = q.to(torch.uint8).reshape(x.shape[0], -1)
    return codes, s16, z16


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, axis: Axis = "out",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = q·s + z per group (computed in float32), back in the (out, in) layout, cast to ``dtype``.
    ``codes`` (rows, rows' length) as :func:`rtn` returns them; scales / zeros (rows, groups)."""
    rows, groups = scales.shape
    q = codes.reshape(rows, groups, -1).float()
    m = (q * scales.float()[..., None] + zeros.float()[..., None]).reshape(rows, -1)
    return (m if axis == "out" else m.T).to(dtype)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F (float64; 0 for an exact zero matrix reproduced exactly)."""
    num = torch.linalg.vector_norm((approx.double() - exact.double()))
    den = torch.linalg.vector_norm(exact.double())
    return float(num / den) if float(den) > 0 else float(num)


# -- the layer ------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as packed k-bit RTN codes with float16 scales and zeros
    (module docstring); ``forward(x) = F.linear(x, dequantized_weight(), bias)``.

    Buffers (persistent, so ``state_dict`` holds them): ``packed`` (uint8), ``scales`` and ``zeros``
    (float16, (rows, groups)); ``bias`` is a frozen parameter (or None) in the original dtype.
    ``dtype`` is the dtype of the original weight, in which the dequantised weight is served.
    Adapters host it as a Linear (``paretune.core.geometry.QuantizedLinearGeometry``)."""

    quantized_matrix = True  # read by paretune.core.geometry (the engine imports nothing above it)

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, group_size: int | None = 128,
                 axis: Axis = "out", bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        check_bits(bits)
        check_axis(axis)
        check_group_size(group_size)
        length = group_length(out_features, in_features, axis)
        g = length if group_size is None else group_size
        if length % g:
            raise ConfigError(f"group_size={group_size} does not divide {length} (axis={axis!r}); choose a divisor "
                              f"of {length}.")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.axis, self.dtype = bits, group_size, axis, dtype
        rows = out_features if axis == "out" else in_features
        numel = in_features * out_features
        self.register_buffer("packed", torch.zeros(packed_bytes(numel, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(rows, length // g, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(rows, length // g, dtype=torch.float16, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int = 4,
                    group_size: int | None = 128, axis: Axis = "out") -> "QuantizedLinear":
        """Quantise a (out, in) weight (and keep ``bias`` as it is)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bits=bits, group_size=group_size, axis=axis, bias=bias is not None,
                    dtype=weight.dtype, device=weight.device)
        layer.set_weight(weight)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_module(cls, module: nn.Module, *, bits: int = 4, group_size: int | None = 128,
                    axis: Axis = "out") -> "QuantizedLinear":
        """From an ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (whose (in, out) weight is transposed)."""
        w = module.weight
        if not isinstance(module, nn.Linear):  # Conv1D: y = x @ W + b, W (in, out)
            w = w.T
        return cls.from_weight(w.detach(), module.bias, bits=bits, group_size=group_size, axis=axis)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> float:
        """Quantise ``weight`` (out, in) into this layer; returns the relative Frobenius error of the
        result against ``weight`` (nothing changes if quantisation fails)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ParetuneError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features}).")
        codes, scales, zeros = rtn(weight, self.bits, self.group_size, self.axis)
        self.packed.copy_(pack(codes, self.bits).to(self.packed.device))
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        return relative_error(self.dequantized_weight(torch.float64 if weight.dtype == torch.float64
                                                      else torch.float32), weight)

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8, in the grouped layout (rows, rows' length)."""
        rows = self.scales.shape[0]
        return unpack(self.packed, self.bits, self.in_features * self.out_features).view(rows, -1)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (out, in) = q·s + z per group, in ``dtype`` (default: the original weight's). A pruned
        layer (a boolean ``prune_mask`` buffer of shape (out, in), True = kept, which
        :mod:`paretune.compress.storage` installs) gets exact zeros where the mask is False."""
        w = dequantize(self.codes(), self.scales, self.zeros, self.axis, dtype or self.dtype)
        mask = self._buffers.get("prune_mask")
        return w if mask is None else w.masked_fill(~mask.to(w.device), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def stored_bytes(self) -> int:
        """Bytes this layer stores: packed codes, scales, zeros and bias."""
        n = sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def settings(self) -> dict:
        """JSON-able settings (what a compressed folder records per module)."""
        return {"bits": self.bits, "group_size": self.group_size, "axis": self.axis,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, axis={self.axis!r}, bias={self.bias is not None}")
