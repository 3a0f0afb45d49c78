"""LayerNorm tuning (Qi, Xu, Zhu et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for
Pre-trained Language Models"; PEFT's LN_TUNING, after Zhao et al. 2023, "Tuning LayerNorm in
Attention: Towards Efficient Multi-Modal LLM Finetuning"): only the gain γ and the bias β of the
normalisation layers train.

As a delta on a normalisation layer (kind "norm", out = γ ⊙ x̂ + β): a change Δγ, stored as the
(d, 1) column ``delta_weight`` of the norm's matrix view, and a change Δβ (d) where the base has a
β (a LayerNorm; an RMSNorm has none, and then gets none), both zero at the start:

    out = base_out + x̂ ⊙ Δγ + Δβ,

x̂ being the input normalised as the base does it. Merging adds Δγ to γ and Δβ to β exactly.
PEFT instead trains a deep copy of each norm layer (``peft/tuners/ln_tuning/layer.py``); the
result is the same function with γ' = γ + Δγ, β' = β + Δβ, and the saved adapter here holds the
changes only.

Default targets (``targets=None``): every normalisation layer of the model (LayerNorm with a
learned scale, RMSNorm), which on Llama is PEFT's ``TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING``
entry (``input_layernorm, post_attention_layernorm, norm``); on BERT it includes the embeddings'
LayerNorm (PEFT has no BERT entry). A model without one is refused.

Trainable per layer: 2·d for a LayerNorm with β, d for an RMSNorm (or a LayerNorm without β).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.inject import iter_modules, kind_of
from ..core.registry import register
from ..errors import TargetError


def default_targets(model: nn.Module) -> list[str]:
    """Every normalisation layer (kind "norm") of the model."""
    names = [n for n, m in iter_modules(model) if n and kind_of(m) == "norm"]
    if not names:
        raise TargetError(
            f"ln-tuning: a {type(model).__name__} has no normalisation layer (LayerNorm with a learned scale or "
            "RMSNorm) to tune; pass targets=[...] naming such layers, or choose another method."
        )
    return names


@dataclasses.dataclass
class LNTuningConfig(AdapterConfig):
    """No options: Δγ and (where the base has β) Δβ of each targeted norm, zero at the start."""


@register(
    "ln-tuning",
    config=LNTuningConfig,
    summary="LayerNorm tuning (Qi et al. 2022): only the norms' gain γ and bias β train; mergeable",
    formula="2·d (LayerNorm with β) or d (RMSNorm)",
    kinds=("norm",),
    default_targets=default_targets,
)
class LNTuningDelta(Delta):
    def __init__(self, geometry: Geometry, config: LNTuningConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.gain = nn.Parameter(torch.zeros(self.d_out, 1, dtype=dtype, device=w.device))
        self.shift = (nn.Parameter(torch.zeros(self.d_out, dtype=dtype, device=w.device))
                      if geometry.bias is not None else None)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.geometry.normalized(x).to(self.gain.dtype) * self.gain.view(-1)
        if self.shift is not None:
            h = h + self.shift
        return base_out + h.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.gain

    def delta_bias(self) -> torch.Tensor | None:
        return self.shift

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LNTuningConfig) -> int:
        """2·d (Δγ and Δβ) for a LayerNorm; an RMSNorm has no β (see :meth:`layer_formula`)."""
        return 2 * d_out

    @classmethod
    def layer_formula(cls, geometry: Geometry, config: LNTuningConfig) -> int:
        """d (Δγ) plus d (Δβ) where the norm has a β."""
        return 2 * geometry.d_out if geometry.bias is not None else geometry.d_out
