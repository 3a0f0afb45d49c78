"""BitNet b1.58: ternary quantisation-aware training of Linear layers.

Paper: Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits"
(arXiv:2402.17764), with the small-model study of Nielsen et al. 2024, "BitNet b1.58 Reloaded:
State-of-the-art Performance Also on Smaller Networks" (arXiv:2407.09527).

A :class:`BitLinear` keeps a full-precision *latent* weight ``W`` (what the optimizer updates) and
computes its forward pass with

* ternary weights (absmean, one scale per matrix): ``γ = mean|W|``,
  ``W̃ = RoundClip(W / (γ + ε), −1, 1) · γ`` (the paper's equation; the paper does not say by what
  the ternary codes are multiplied back, we use ``γ`` itself, so a matrix of zeros stays zeros);
* 8-bit activations (absmax, one scale per token, i.e. per row of the last dimension):
  ``x̃ = Clip(round(x · 127 / max|x|), −128, 127) · max|x| / 127`` with ``max|x|`` floored at ``ε``
  so that a token of zeros gives zeros instead of NaN (the paper is silent on that case);
* straight-through gradients: ``W + (W̃ − W).detach()`` and ``x + (x̃ − x).detach()``, so the
  backward pass treats both quantisers as the identity (the paper's training recipe; also the
  released "training tips" code of the BitNet authors).

``ε = 1e-5`` (the value of that released code).

Normalisation: the paper places a LayerNorm ("SubLN") before every quantised input. A model
trained from scratch needs it; :func:`to_bitnet` converts a *pretrained* model, where a new norm
would change the function before any training step, and Llama-style blocks already have an
RMSNorm before q/k/v and gate/up. So by default no norm is inserted; ``input_norm=True`` adds a
parameter-free RMSNorm inside each BitLinear (as the released training-tips code does), for
training from scratch or for users who want the paper's layout.

After training, :func:`freeze_ternary` replaces each BitLinear by a :class:`TernaryLinear`
holding int8 codes in {−1, 0, 1} and one float scale per matrix; its forward equals the BitLinear's
(same activation quantiser, weight ``codes · scale``). :func:`save_ternary` / :func:`load_ternary`
store such a model as safetensors + JSON.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TargetError
from .state_folder import load_unique_state, read_state_meta, saved_linear, write_state_folder

EPS = 1e-5
Targets = Union[str, Sequence[str], None]

try:  # GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None


# --------------------------------------------------------------------------------------------
# quantisers
# --------------------------------------------------------------------------------------------
def weight_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``γ = mean|W|`` over the whole matrix (a 0-d tensor)."""
    return w.abs().mean()


def ternary_codes(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, γ)``: ``codes = RoundClip(W / (γ + ε), −1, 1)`` as int8 and ``γ = mean|W|``."""
    gamma = weight_scale(w, eps)
    codes = torch.clamp(torch.round(w / (gamma + eps)), -1, 1)
    return codes.to(torch.int8), gamma


def ternary_weight(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``W̃ = RoundClip(W / (γ + ε), −1, 1) · γ`` in ``w``'s dtype (no gradient trick)."""
    gamma = weight_scale(w, eps)
    return torch.clamp(torch.round(w / (gamma + eps)), -1, 1) * gamma


def quantize_activations(x: torch.Tensor, bits: int = 8, eps: float = EPS) -> torch.Tensor:
    """Per-token absmax quantisation to ``bits`` bits, dequantised: ``Q_b = 2^(b−1)``,
    ``x̃ = Clip(round(x · (Q_b − 1) / max|x|), −Q_b, Q_b − 1) · max|x| / (Q_b − 1)``."""
    q = 2 ** (bits - 1)
    m = x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return torch.clamp(torch.round(x * ((q - 1) / m)), -q, q - 1) * (m / (q - 1))


def _rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class BitLinear(nn.Module):
    """A Linear trained with ternary weights and 8-bit activations (straight-through); see the
    module docstring for the formulas. ``weight`` (out, in) is the latent full-precision weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, act_bits: int = 8,
                 input_norm: bool = False, eps: float = EPS, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_bits, self.input_norm, self.eps = act_bits, input_norm, eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, module: nn.Module, *, act_bits: int = 8, input_norm: bool = False) -> "BitLinear":
        """A BitLinear whose latent weight and bias are (copies of) ``module``'s (an nn.Linear or a
        GPT-2 Conv1D, whose (in, out) weight is transposed)."""
        w, b = _weight_and_bias(module)
        new = cls(w.shape[1], w.shape[0], bias=b is not None, act_bits=act_bits, input_norm=input_norm,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
        new.weight.requires_grad_(module.weight.requires_grad)
        return new

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm:
            x = _rms_norm(x)
        return x + (quantize_activations(x, self.act_bits, self.eps) - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_q = w + (ternary_weight(w, self.eps) - w).detach()
        return F.linear(self.quantized_input(x), w_q, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=ternary, act_bits={self.act_bits}, input_norm={self.input_norm}")


class TernaryLinear(nn.Module):
    """Inference form of a trained BitLinear: ``codes`` (int8 in {−1, 0, 1}, (out, in)) and one
    ``scale`` per matrix; forward = ``F.linear(x̃, codes · scale, bias)`` with the same 8-bit
    activation quantiser (and the same optional RMSNorm)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *, act_bits: int = 8,
                 input_norm: bool = False, eps: float = EPS):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.act_bits, self.input_norm, self.eps = act_bits, input_norm, eps
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.detach().reshape(()).clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm:
            x = _rms_norm(x)
        x = quantize_activations(x, self.act_bits, self.eps)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=ternary int8 codes, act_bits={self.act_bits}")


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out, in), bias) of an nn.Linear or a GPT-2 Conv1D."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.detach().t(), (module.bias.detach() if module.bias is not None else None)
    return module.weight.detach(), (module.bias.detach() if module.bias is not None else None)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def _head_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] in ("lm_head", "classifier", "score"):
            names.add(name)
    return names


def select_linear(model: nn.Module, targets: Targets, what: str, kinds: tuple[type, ...] = ()) -> list[str]:
    """Names of the Linear / Conv1D modules ``targets`` selects (``kinds``: other module types that
    also count as a match, e.g. an already-converted layer).

    * ``None`` or ``"all-linear"``: every Linear / Conv1D except the output head (and a
      classification head), as ``paretune.adapt`` does;
    * a string: a regular expression matching the whole module name;
    * a list of strings: exact module names or name suffixes (``"q_proj"``).
    """
    from ..core.host import Host

    mods = [(n, m) for n, m in model.named_modules() if n]
    hosted = [n for n, m in mods if isinstance(m, Host)]
    if hosted:
        raise TargetError(f"{what}: the model carries adapters ({', '.join(hosted[:5])}); convert the base model "
                          "first, then adapt it (or merge the adapters with paretune.merge and unload them).")
    linear = [n for n, m in mods if _is_linear(m)]
    if targets is None or targets == "all-linear":
        heads = _head_names(model)
        chosen = [n for n in linear if n not in heads]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise TargetError(f"{what}: targets={targets!r} is not a valid regular expression ({e}).") from None
        chosen = [n for n in linear if pattern.fullmatch(n)]
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    else:
        raise TargetError(f"{what}: targets={targets!r} is not understood: give None / 'all-linear', a regex "
                          "string, or a list of module names / suffixes such as ['q_proj', 'v_proj'].")
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in linear})
        raise TargetError(f"{what}: targets {targets!r} matched no Linear layer. Linear layers of this model end "
                          f"in: {', '.join(suffixes) or '(none)'}.")
    return chosen


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_bitnet(model: nn.Module, targets: Targets = None, *, act_bits: int = 8, input_norm: bool = False) -> nn.Module:
    """Replace the chosen Linear / Conv1D layers of ``model`` (in place) by :class:`BitLinear`
    (latent weight = the layer's weight) and return the model. ``targets`` as in
    ``paretune.adapt`` (default: every Linear but the output head). No norm is inserted unless
    ``input_norm=True`` (see the module docstring). Every other parameter keeps its
    ``requires_grad``; train the converted model with ``paretune.train(model, ..., method="full")``
    (quantisation-aware training of the whole model, as the paper) or mark parameters yourself."""
    if not isinstance(act_bits, int) or not 2 <= act_bits <= 16:
        raise ConfigError(f"act_bits={act_bits!r}: give an integer number of activation bits between 2 and 16 "
                          "(the paper uses 8).")
    if any(isinstance(m, (BitLinear, TernaryLinear)) for m in model.modules()):
        raise ConfigError("to_bitnet: the model already has BitLinear / ternary layers; convert a model only once.")
    for name in select_linear(model, targets, "to_bitnet"):
        set_module(model, name, BitLinear.from_linear(model.get_submodule(name), act_bits=act_bits,
                                                      input_norm=input_norm))
    return model


def prepare_bitnet_training(model: nn.Module, targets: Targets = None, *, input_norm: bool = False) -> nn.Module:
    """What a trainer calls before quantisation-aware training: :func:`to_bitnet` (a model that
    already has BitLinear layers is left as it is, so a resumed run can call it again) and every
    BitLinear's latent weight and bias set to require grad. Returns the model."""
    if not any(isinstance(m, BitLinear) for m in model.modules()):
        to_bitnet(model, targets, input_norm=input_norm)
    for m in model.modules():
        if isinstance(m, BitLinear):
            for p in m.parameters():
                p.requires_grad_(True)
    return model


def freeze_ternary(model: nn.Module) -> nn.Module:
    """Replace every :class:`BitLinear` (in place) by a :class:`TernaryLinear` with int8 codes in
    {−1, 0, 1} and one scale per matrix, computed from the trained latent weights; returns the
    model. The frozen model's outputs equal the BitLinear model's (same quantisers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not names:
        raise ConfigError("freeze_ternary: the model has no BitLinear layer; call to_bitnet (and train) first.")
    for name in names:
        m = model.get_submodule(name)
        codes, gamma = ternary_codes(m.weight.detach(), m.eps)
        set_module(model, name, TernaryLinear(codes, gamma, m.bias, act_bits=m.act_bits, input_norm=m.input_norm,
                                              eps=m.eps))
    return model


def ternary_summary(model: nn.Module) -> dict[str, float]:
    """Counts of a frozen model: ``ternary_weights`` (entries stored as codes), ``other_parameters``
    and ``ternary_bits`` (1.58 bits per code, log2 3), ``zero_fraction`` of the codes."""
    n_tern, zeros, other = 0, 0, 0
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            n_tern += m.codes.numel()
            zeros += int((m.codes == 0).sum())
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            other += p.numel()
    import math

    return {"ternary_weights": n_tern, "other_parameters": other, "ternary_bits": n_tern * math.log2(3),
            "zero_fraction": zeros / n_tern if n_tern else 0.0}


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
FORMAT = "paretune-ternary"
VERSION = 1


def save_ternary(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a frozen model to the folder ``path``: ``ternary.json`` (which modules are ternary,
    their activation bits and norm flag) and ``model.safetensors`` (the whole state dict: int8
    codes, scales and every other tensor once; tied tensors are stored under their first name).
    The folder appears complete or not at all."""
    layers = {n: {"act_bits": m.act_bits, "input_norm": m.input_norm, "eps": m.eps}
              for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    if not layers:
        if any(isinstance(m, BitLinear) for m in model.modules()):
            raise ConfigError("save_ternary: the model still has BitLinear layers; call freeze_ternary(model) first.")
        raise ConfigError("save_ternary: the model has no ternary layer; convert it with to_bitnet, train, and "
                          "freeze_ternary first.")
    return write_state_folder(model, path, "ternary.json", {"format": FORMAT, "version": VERSION, "layers": layers})


def load_ternary(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_ternary` into ``model``, a model of the same
    architecture as the one saved (as loaded from the Hub / ``paretune.models.load``, before any
    conversion): its layers are converted to :class:`TernaryLinear` and every tensor is read from
    the file. Returns the model."""
    path = Path(path)
    meta = read_state_meta(path, "ternary.json", FORMAT, "ternary model description",
                           "paretune.compress.bitnet.save_ternary")
    for name, opts in meta["layers"].items():
        base = saved_linear(model, name, path, _is_linear)
        w, b = _weight_and_bias(base)
        set_module(model, name, TernaryLinear(torch.zeros(w.shape, dtype=torch.int8, device=w.device),
                                              torch.zeros((), dtype=w.dtype, device=w.device), b,
                                              act_bits=opts["act_bits"], input_norm=opts["input_norm"],
                                              eps=opts["eps"]))
    load_unique_state(model, path / "model.safetensors", meta.get("aliases", {}))
    return model
