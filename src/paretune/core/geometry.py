"""How each kind of base module reads as a matrix map ``y = W x`` of shape (d_out, d_in).

A Delta is written once against this view; the geometry maps it onto the module's real op:

=========  =====================  ====================================================
kind       native weight          matrix view (d_out, d_in) and input projection
=========  =====================  ====================================================
linear     (out, in)              W;           M x  = x @ M.T
conv1d     (in, out) (GPT-2)      W.T;         M x  = x @ M.T
embedding  (num, dim)             W.T;         M x  = M.T[ids]  (a one-hot input)
conv2d     (out, in, kh, kw)      (out, in*kh*kw); M x = conv2d(x, M as a kernel)
=========  =====================  ====================================================

A quantised Linear (packed k-bit codes) is read as kind "linear" through its dequantised weight
(:class:`QuantizedLinearGeometry`); merging into it quantises the sum again.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError

try:  # transformers' GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None


class Geometry:
    """The matrix view of a base module (see the module docstring)."""

    kind = ""

    def __init__(self, base: nn.Module):
        self.base = base
        self.name = ""  # the module's name in the model, set when it is hosted (IA3's feed-forward layers)
        self.host = None  # the Host around the module once hosted (methods that combine other adapters' deltas)
        self.root = None  # the model it was hosted in (prompt / prefix tuning hook the model's forward)

    # shapes ---------------------------------------------------------------------------------
    @property
    def d_out(self) -> int:
        raise NotImplementedError

    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    # matrix view ---------------------------------------------------------------------------
    def matrix(self) -> torch.Tensor:
        """The base weight as a (d_out, d_in) matrix (a view where possible)."""
        raise NotImplementedError

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) matrix in the base weight's own layout."""
        raise NotImplementedError

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor, sign: float = 1.0) -> None:
        """W += sign * delta, computed in float32 (float64 for a float64 weight) and cast back to
        the weight's dtype."""
        w = self.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        new = w.to(dtype) + sign * self.to_native(delta.to(dtype))
        w.copy_(new.to(w.dtype))

    @torch.no_grad()
    def add_at(self, flat: torch.Tensor, values: torch.Tensor, sign: float = 1.0) -> None:
        """W[p] += sign * values at the flat positions ``flat`` (row · d_in + col) of the
        (d_out, d_in) view, touching only those entries; positions must be unique. In place on
        the weight's own storage where the view is contiguous (Linear, Conv2d), else through
        (row, col) indexing (Conv1D, Embedding); half-precision weights add in float32."""
        m = self.matrix()
        dtype = torch.promote_types(m.dtype, torch.float32)
        flat = flat.to(m.device, torch.long)
        add = sign * values.to(m.device, dtype)
        if m.is_contiguous():
            w = m.view(-1)
            if w.dtype == dtype:
                w.index_add_(0, flat, add)
            else:
                w.index_copy_(0, flat, (w.index_select(0, flat).to(dtype) + add).to(w.dtype))
            return
        rows, cols = flat // self.d_in, flat % self.d_in
        m[rows, cols] = (m[rows, cols].to(dtype) + add).to(m.dtype)

    # ops -----------------------------------------------------------------------------------
    def project_in(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Apply a (k, d_in) matrix to the input as the base op would: a k-channel output."""
        return F.linear(x, m)

    def project_out(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Apply a (d_out, k) matrix to a k-channel hidden output: shaped like the base output."""
        return F.linear(h, m)

    def channel_dim(self) -> int:
        """Which dimension of the output holds the d_out channels."""
        return -1


class LinearGeometry(Geometry):
    kind = "linear"

    @property
    def d_out(self) -> int:
        return self.base.out_features

    @property
    def d_in(self) -> int:
        return self.base.in_features

    def matrix(self) -> torch.Tensor:
        return self.base.weight

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        return delta


class Conv1DGeometry(Geometry):
    """transformers' ``Conv1D`` (GPT-2): weight (in, out), y = x @ W + b."""

    kind = "conv1d"

    @property
    def d_out(self) -> int:
        return self.base.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.base.weight.shape[0]

    def matrix(self) -> torch.Tensor:
        return self.base.weight.T

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T


class EmbeddingGeometry(Geometry):
    """``nn.Embedding`` as a linear map from one-hot ids (d_in = num_embeddings) to vectors."""

    kind = "embedding"

    @property
    def d_out(self) -> int:
        return self.base.embedding_dim

    @property
    def d_in(self) -> int:
        return self.base.num_embeddings

    def matrix(self) -> torch.Tensor:
        return self.base.weight.T

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    def project_in(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.embedding(x, m.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)


class Conv2dGeometry(Geometry):
    """``nn.Conv2d`` (groups=1): the kernel flattened to (out, in*kh*kw); the down projection is
    a convolution with the base's stride, padding and dilation, the up projection a 1x1."""

    kind = "conv2d"

    def __init__(self, base: nn.Conv2d):
        super().__init__(base)
        if base.groups != 1:
            raise TargetError(
                f"Conv2d with groups={base.groups} is not supported (only groups=1); "
                "leave grouped or depthwise convolutions out of `targets`."
            )
        if base.padding_mode != "zeros":
            raise TargetError(f"Conv2d with padding_mode={base.padding_mode!r} is not supported (only 'zeros').")

    @property
    def d_out(self) -> int:
        return self.base.out_channels

    @property
    def d_in(self) -> int:
        kh, kw = self.base.kernel_size
        return self.base.in_channels * kh * kw

    def matrix(self) -> torch.Tensor:
        return self.base.weight.reshape(self.d_out, -1)

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.base.weight.shape)

    def project_in(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        b = self.base
        kernel = m.reshape(m.shape[0], b.in_channels, *b.kernel_size)
        return F.conv2d(x, kernel, None, b.stride, b.padding, b.dilation)

    def project_out(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bk...,ok->bo...", h, m)

    def channel_dim(self) -> int:
        return 1


class NormGeometry(Geometry):
    """A normalisation layer with a per-channel scale γ (``nn.LayerNorm``, ``nn.RMSNorm`` and the
    RMSNorm classes of transformers models): out = γ ⊙ x̂ (+ β). Its matrix view is γ as a
    (d, 1) column, so that a change of γ merges like any ΔW; :meth:`normalized` gives x̂."""

    kind = "norm"

    @property
    def d_out(self) -> int:
        return self.base.weight.numel()

    @property
    def d_in(self) -> int:
        return 1

    def matrix(self) -> torch.Tensor:
        return self.base.weight.view(-1, 1)

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.base.weight.shape)

    @property
    def rms(self) -> bool:
        """An RMSNorm (no centring, no bias) rather than a LayerNorm."""
        return not isinstance(self.base, nn.LayerNorm)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x̂: the input normalised as the base does it, before its scale and shift (float32 inside,
        returned in x's dtype, as transformers' RMSNorm computes)."""
        b = self.base
        eps = getattr(b, "eps", None)
        eps = getattr(b, "variance_epsilon", 1e-6) if eps is None else eps
        if not self.rms:
            return F.layer_norm(x, b.normalized_shape, None, None, eps)
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class BlockGeometry(Geometry):
    """A sub-layer of a network taken whole (an attention or MLP block, BERT's output block): a map
    of the hidden states, d_in = d_out = its output width (that of its last Linear). It has no
    matrix of its own: methods on it (bottleneck adapters) add modules around it and do not merge."""

    kind = "block"

    def __init__(self, base: nn.Module, last: nn.Module):
        super().__init__(base)
        self.last = last

    @property
    def d_out(self) -> int:
        return self.last.out_features if isinstance(self.last, nn.Linear) else self.last.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.d_out

    @property
    def weight(self) -> torch.Tensor:  # dtype and device of the block
        return self.last.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None

    def matrix(self) -> torch.Tensor:
        raise TargetError(f"a {type(self.base).__name__} block has no weight matrix to merge into")

    def to_native(self, delta: torch.Tensor) -> torch.Tensor:
        raise TargetError(f"a {type(self.base).__name__} block has no weight matrix to merge into")


# -- quantised base layers -----------------------------------------------------------------------
class QuantizedLinearGeometry(LinearGeometry):
    """A quantised Linear (``paretune.compress.quantized.QuantizedLinear``, recognised by its class
    attribute ``quantized_matrix = True``; the engine imports nothing above it) read as the Linear
    its dequantised weight Ŵ makes: adapters on it train in float while the base stays packed
    (QLoRA's arrangement, Dettmers et al. 2023).

    ``weight`` and ``matrix()`` are Ŵ, a new tensor on each call (writing into it changes nothing).
    Merging (``add_to_weight`` / ``add_at``) dequantises, adds ΔW in float32 (float64 for a float64
    ΔW), quantises the sum again with the layer's own bits, group size and axis, and warns with the
    relative Frobenius error of the requantised weight against the exact Ŵ + ΔW (and ‖ΔW‖/‖Ŵ‖ beside
    it, to compare). Unmerging does the same with −ΔW, so after merge and unmerge the weight is the
    requantisation of (requantised Ŵ + ΔW) − ΔW, not the original codes: both steps add a rounding
    error of at most s/2 per entry. A delta that changes the base at construction (``shifts_base``:
    PiSSA moves its principal part out of W) is refused: the residual could not stay exact in k bits."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.dequantized_weight()

    def matrix(self) -> torch.Tensor:
        return self.base.dequantized_weight()

    def _requantize(self, new: torch.Tensor, delta_norm: float, sign: float) -> None:
        err = self.base.set_weight(new)
        ref = float(torch.linalg.vector_norm(new.double())) or 1.0
        layer = self.name or type(self.base).__name__
        warnings.warn(QuantizedMergeWarning(
            f"{'merging into' if sign > 0 else 'unmerging from'} the {self.base.bits}-bit quantised layer "
            f"{layer}: the weight was dequantised, changed by ΔW "
            f"(‖ΔW‖/‖W‖ = {delta_norm / ref:.3g}) and quantised again; the requantised weight differs from the exact "
            f"W {'+' if sign > 0 else '−'} ΔW by a relative Frobenius error of {err:.3g}.",
            layer=layer, error=err, delta=delta_norm / ref, bits=self.base.bits, merging=sign > 0), stacklevel=3)

    def add_to_weight(self, delta: torch.Tensor, sign: float = 1.0) -> None:
        with torch.no_grad():
            dtype = torch.promote_types(delta.dtype, torch.float32)
            w = self.base.dequantized_weight(dtype)
            d = sign * delta.to(w.device, dtype)
            self._requantize(w + d, float(torch.linalg.vector_norm(d.double())), sign)

    def add_at(self, flat: torch.Tensor, values: torch.Tensor, sign: float = 1.0) -> None:
        with torch.no_grad():
            dtype = torch.promote_types(values.dtype, torch.float32)
            w = self.base.dequantized_weight(dtype)
            add = sign * values.to(w.device, dtype)
            new = w.reshape(-1).index_add(0, flat.to(w.device, torch.long), add).view_as(w)
            self._requantize(new, float(torch.linalg.vector_norm(add.double())), sign)


class QuantizedMergeWarning(UserWarning):
    """Merging into (or unmerging from) a quantised base layer added a requantisation error.
    ``layer``, ``error`` (relative Frobenius error of the requantised weight against the exact sum),
    ``delta`` (‖ΔW‖/‖W‖), ``bits`` and ``merging`` say which and how much; ``paretune.merge`` and
    ``unmerge`` gather one warning per layer into a single summary of the same class (``layers``
    then lists every layer's ``(name, error, delta)``)."""

    def __init__(self, message: str, *, layer: str = "", error: float = 0.0, delta: float = 0.0, bits: int = 0,
                 merging: bool = True, layers: list | None = None):
        super().__init__(message)
        self.layer, self.error, self.delta, self.bits, self.merging = layer, error, delta, bits, merging
        self.layers = layers if layers is not None else [(layer, error, delta)]


@contextlib.contextmanager
def one_quantized_merge_warning(what: str):
    """Around merging or unmerging an adapter on many layers: the per-layer
    :class:`QuantizedMergeWarning` become one summary warning (how many quantised layers, the largest
    and median error, the largest ‖ΔW‖/‖W‖); other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    found = [w.message for w in caught if isinstance(w.message, QuantizedMergeWarning)]
    for w in caught:
        if not isinstance(w.message, QuantizedMergeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not found:
        return
    rows = [row for m in found for row in m.layers]
    errors = sorted(e for _, e, _ in rows)
    worst = max(rows, key=lambda r: r[1])
    bits = sorted({m.bits for m in found})
    warnings.warn(QuantizedMergeWarning(
        f"{what} {len(rows)} quantised layer(s) ({'/'.join(map(str, bits))}-bit): each weight was dequantised, changed "
        f"by ΔW and quantised again. Relative Frobenius error of the requantised weights against the exact sums: "
        f"largest {worst[1]:.3g} ({worst[0]}), median {errors[len(errors) // 2]:.3g}; largest ‖ΔW‖/‖W‖ "
        f"{max(d for _, _, d in rows):.3g}. Keep the adapter unmerged to avoid this error.",
        layer=worst[0], error=worst[1], delta=max(d for _, _, d in rows), bits=max(bits), merging=found[0].merging,
        layers=rows), stacklevel=4)


def _is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return False
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    rms = getattr(nn, "RMSNorm", None)
    return (rms is not None and isinstance(module, rms)) or type(module).__name__.endswith("RMSNorm")


def _last_linear(module: nn.Module) -> nn.Module | None:
    """The last Linear / Conv1D registered under ``module`` (its output projection), if any."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear) or (Conv1D is not None and isinstance(m, Conv1D)):
            last = m
    return last


def geometry_for(module: nn.Module) -> Geometry | None:
    """The geometry of a supported base module, or None if its kind is not supported: Linear (or a
    quantised Linear),
    GPT-2 Conv1D, Embedding, Conv2d, a normalisation layer, or a block (a module with its own
    forward and a Linear inside, hosted whole by methods that declare the "block" kind)."""
    if getattr(type(module), "quantized_matrix", False):
        return QuantizedLinearGeometry(module)
    if isinstance(module, nn.Linear):
        return LinearGeometry(module)
    if Conv1D is not None and isinstance(module, Conv1D):
        return Conv1DGeometry(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingGeometry(module)
    if isinstance(module, nn.Conv2d):
        return Conv2dGeometry(module)
    if _is_norm(module):
        return NormGeometry(module)
    if type(module).forward is not nn.Module.forward and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        last = _last_linear(module)
        if last is not None:
            return BlockGeometry(module, last)
    return None


SUPPORTED_TYPES: tuple[type, ...] = tuple(t for t in (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d) if t is not None)
