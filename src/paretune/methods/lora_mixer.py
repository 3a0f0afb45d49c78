"""LoRA-Mixer (Li et al. 2025, "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention
Routing", arXiv 2507.00029, ICLR 2026).

Each adapted projection of the attention module (the paper's "input/output linear layers": Llama
``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; BERT ``query``, ``key``, ``value`` and
``attention.output.dense``; GPT-2 ``attn.c_attn`` and ``attn.c_proj``) gets E LoRA experts
ΔW_e = s·B_e A_e (A_e ∈ R^{r×d_in}, B_e ∈ R^{d_out×r}, s = alpha / r) and a router
p(x) = softmax(W_g x) (W_g ∈ R^{E×d_in}). The projection's output becomes

    y = W₀x + Σ_e g_e(x)·s·B_e A_e x,

so the routed change enters the attention computation itself ("serial" routing: it is not a branch
beside the attention block). The routing is per token, so the adapter is input-dependent and
cannot be merged into W (``mergeable = False``: merge raises a clear error).

Routing (``routing``), as the paper describes its hard–soft scheme:

* ``"hard-soft"`` (default): training fuses all experts with the soft router weights g = p(x)
  (fully differentiable); inference routes each token to its ``top_k`` experts with the weights
  renormalised over them (the paper infers with top-3 routing; ``top_k=3`` is the default);
* ``"soft"``: g = p(x) in training and inference;
* ``"top-k"``: the renormalised top-k weights in training and inference (gradients reach the
  router through the selected weights).

Routing Specialization (Balance) Loss, the paper's Eq. 5 (called the Specialization Balance Loss in
its first version): with p̄_i the mean soft router probability of expert i over the tokens of the
batch and f̄_i the fraction of routing slots of the top-k assignment that went to expert i
(count of tokens whose top-k contains i, divided by tokens·k, so Σ f̄_i = 1),

    L = balance_weight · Σ_i p̄_i f̄_i  +  entropy_weight · mean_tokens H(p(x)),
    H(p) = −Σ_i p_i log p_i.

It is built in each training forward pass (one per adapted projection) and returned by
:meth:`aux_loss`; the trainer adds the sum over layers to the task loss and logs it.

Choices where the paper is silent or ambiguous, stated:

* Sign of the entropy term: the paper's Eq. 5 prints ``− λ·E[H(p(x))]``, while its text says that
  minimising H(p(x)) promotes peaked, input-aware routing (specialization). Here ``entropy_weight``
  multiplies ``+H`` (the text's intent: minimising the loss sharpens each token's routing); a
  negative ``entropy_weight`` gives the sign as printed (entropy maximised).
* Balance term as printed, without Switch Transformer's factor E; f̄ is computed from the top-k
  assignment with no gradient (it is a count), p̄ carries the gradient.
* Weights: ``balance_weight = 0.01`` (Switch Transformer's load-balance coefficient) and
  ``entropy_weight = 0.01``: defaults chosen here, not the paper's settings.
* E = ``n_experts = 4`` experts of rank ``r = 8`` each, ``alpha = 16`` (LoRA's usual scale).
* One router per adapted projection, a bias-free linear map of the projection's input,
  kaiming-uniform(a=√5) as ``nn.Linear``; experts as LoRA: A kaiming-uniform(a=√5), B = 0, so the
  adapted model starts equal to the base whatever the router does.
* The balance statistics are taken over every position of the batch (the host sees no attention
  mask, so padding positions count too).
* ``dropout`` acts on the experts' input (LoRA's dropout), not on the router's.
* Experts are trained jointly with the router here. The paper's other regime, routing over frozen
  LoRA modules trained elsewhere, and its optional expert-preservation penalty are not provided.

Trainable per adapted layer: E·r·(d_in + d_out) + E·d_in.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import TargetError
from .bottleneck import _module_names

ROUTINGS = ("hard-soft", "soft", "top-k")

# The attention projections per architecture family, as regexes over whole module names.
ATTENTION_PROJECTIONS: dict[str, str] = {
    "llama": r"(?:.*\.)?layers\.\d+\.self_attn\.(?:q|k|v|o)_proj",
    "bert": r"(?:.*\.)?layer\.\d+\.attention\.(?:self\.(?:query|key|value)|output\.dense)",
    "gpt2": r"(?:.*\.)?h\.\d+\.attn\.(?:c_attn|c_proj)",
}


@dataclasses.dataclass
class LoraMixerConfig(AdapterConfig):
    """``n_experts`` LoRA experts of rank ``r`` per layer, scale ``alpha / r``; ``routing``:
    "hard-soft" | "soft" | "top-k"; ``top_k``: experts per token where routing is sparse;
    ``balance_weight`` and ``entropy_weight``: the Routing Specialization Loss's α and λ;
    ``dropout``: on the experts' input."""

    r: int = 8
    alpha: float = 16.0
    n_experts: int = 4
    top_k: int = 3
    routing: str = "hard-soft"
    balance_weight: float = 0.01
    entropy_weight: float = 0.01
    dropout: float = 0.0

    def validate(self) -> None:
        self._positive_int("r")
        self._non_negative("alpha")
        self._positive_int("n_experts")
        self._positive_int("top_k")
        self._require(self.top_k <= self.n_experts if isinstance(self.top_k, int) else True, "top_k", self.top_k,
                      f"it must be at most n_experts={self.n_experts}")
        self._one_of("routing", ROUTINGS)
        self._non_negative("balance_weight")
        v = self.entropy_weight
        self._require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                      "entropy_weight", v, "it must be a finite number (negative: the entropy is maximised)")
        self._probability("dropout")


def default_targets(model: nn.Module) -> str:
    """The attention projections of a Llama-style, BERT-style or GPT-2 model."""
    names = _module_names(model)
    for pattern in ATTENTION_PROJECTIONS.values():
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    raise TargetError(
        f"lora-mixer: no default attention projections for a {type(model).__name__} (known: Llama-style, "
        "BERT-style and GPT-2 module names). Pass targets=... naming the attention's input and output "
        "projections (e.g. targets=['q_proj', 'k_proj', 'v_proj', 'o_proj'])."
    )


def top_k_gates(p: torch.Tensor, k: int) -> torch.Tensor:
    """p kept at each row's k largest entries, renormalised to sum to 1, zero elsewhere."""
    idx = p.topk(k, dim=-1).indices
    kept = torch.zeros_like(p).scatter(-1, idx, 1.0) * p
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def routing_loss(p: torch.Tensor, k: int, balance_weight: float, entropy_weight: float) -> torch.Tensor:
    """The Routing Specialization Loss of router probabilities ``p`` (tokens × E): balance_weight ·
    Σ_i p̄_i f̄_i + entropy_weight · mean H(p) (see the module's docstring)."""
    p = p.reshape(-1, p.shape[-1])
    n_tokens, n_experts = p.shape
    idx = p.detach().topk(k, dim=-1).indices
    f = torch.bincount(idx.reshape(-1), minlength=n_experts).to(p.dtype) / (n_tokens * k)
    balance = (p.mean(dim=0) * f).sum()
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=-1).mean()
    return balance_weight * balance + entropy_weight * entropy


@register(
    "lora-mixer",
    config=LoraMixerConfig,
    summary="LoRA-Mixer (Li et al. 2025): E LoRA experts per attention projection, routed per token "
            "(soft in training, top-k at inference), with the Routing Specialization Loss",
    formula="E·r·(d_in + d_out) + E·d_in, E = n_experts",
    kinds=("linear", "conv1d"),
    default_targets=default_targets,
)
class LoraMixerDelta(Delta):
    """A (E, r, d_in) kaiming-uniform, B (E, d_out, r) zero, router (E, d_in) kaiming-uniform."""

    mergeable = False  # per-token routing: no single ΔW

    def __init__(self, geometry: Geometry, config: LoraMixerConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        e, r = config.n_experts, config.r
        self.scaling = config.alpha / r
        self.top_k = config.top_k
        self.routing = config.routing
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.A = nn.Parameter(torch.empty(e, r, self.d_in, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(e, self.d_out, r, dtype=dtype, device=w.device))
        self.router = nn.Parameter(torch.empty(e, self.d_in, dtype=dtype, device=w.device))
        for i in range(e):  # each expert's A as nn.Linear(d_in, r) would be
            nn.init.kaiming_uniform_(self.A.data[i], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self._aux: torch.Tensor | None = None

    def gates(self, p: torch.Tensor) -> torch.Tensor:
        """The experts' weights per token from the router probabilities, by the routing mode."""
        sparse = self.routing == "top-k" or (self.routing == "hard-soft" and not self.training)
        return top_k_gates(p, self.top_k) if sparse else p

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router probabilities p(x) = softmax(W_g x), (..., E)."""
        return torch.softmax(F.linear(x.to(self.router.dtype), self.router), dim=-1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = x.to(self.A.dtype)
        p = self.route(h)
        if self.training and torch.is_grad_enabled():
            cfg = self.config
            self._aux = routing_loss(p, self.top_k, cfg.balance_weight, cfg.entropy_weight)
        g = self.gates(p)
        if self.drop is not None:
            h = self.drop(h)
        z = torch.einsum("...d,erd->...er", h, self.A) * g.unsqueeze(-1)
        out = torch.einsum("...er,eor->...o", z, self.B)
        return base_out + (out * self.scaling).to(base_out.dtype)

    def aux_loss(self) -> torch.Tensor | None:
        aux, self._aux = self._aux, None
        return aux

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LoraMixerConfig) -> int:
        return config.n_experts * (config.r * (d_in + d_out) + d_in)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"lora-mixer: {cfg.n_experts} experts of rank {cfg.r}, {self.routing} routing (top-{self.top_k}), "
                f"d_in={self.d_in}, d_out={self.d_out}")
