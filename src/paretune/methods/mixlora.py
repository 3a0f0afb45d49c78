"""MixLoRA (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts", arXiv:2404.15159): each feed-forward sub-layer of a frozen dense model becomes a
sparse mixture of E experts, expert e being the frozen feed-forward network with its own LoRA on
each of its linear layers; a top-k router picks k experts per token; the attention projections get
ordinary LoRA; an auxiliary load-balance loss keeps the router from collapsing onto few experts.

For a token x with router logits z = W_r x (W_r ∈ R^{E×d}, no bias):

    p = softmax(z),  K = the k largest entries of p,  w_e = p_e / Σ_{j∈K} p_j  (e ∈ K)
    FFN_MoE(x) = Σ_{e∈K} w_e · FFN_e(x),   FFN_e = FFN with W_j + s·B_{e,j} A_{e,j} on each linear j

(the reference's routing: a softmax over all E logits, the top k kept and renormalised, which is
the softmax over the top-k logits). As Σ w_e = 1 the output is computed as
``base_out + Σ_e w_e·(FFN_e(x) − FFN(x))``, so it stacks on other adapters and, with every
B = 0 at the start, equals the base exactly.

Load-balance loss per routed feed-forward layer (Switch Transformers' form as the reference
computes it for top-k, ``_mixtral_load_balancing_loss_func`` in TUDB-Labs/MoE-PEFT
``moe_peft/modules/mix_lora.py``):

    L_aux = coef · E · Σ_e f_e · P_e,   f_e = (1/N) Σ_tokens Σ_slots 1[expert of the slot = e],
                                        P_e = (1/N) Σ_tokens p_e

(f counts the k slots, so Σ_e f_e = k and a balanced router gives E·Σ f_e P_e = k). It is built in
the training forward pass (``self.training`` and gradients on) and handed to the trainer by
:meth:`MixLoraDelta.aux_loss`.

Sites (``default_targets``; a regex per architecture family, found from module names):

* Llama-style: the ``model.layers.N.mlp`` blocks (experts on gate_proj, up_proj, down_proj) and
  LoRA on ``self_attn.{q,k,v,o}_proj``;
* GPT-2: the ``transformer.h.N.mlp`` blocks (experts on c_fc, c_proj) and LoRA on
  ``attn.c_attn`` (the fused q, k, v projection) and ``attn.c_proj``;
* BERT-style (BertModel, BertForSequenceClassification, MiniLM): the feed-forward network spans two
  modules, ``layer.N.intermediate`` (dense₁ + activation) and ``layer.N.output`` (dense₂, dropout,
  residual, LayerNorm). Both ``intermediate`` (as a block) and ``output.dense`` (a Linear) are
  adapted: the ``intermediate`` delta routes each token once, runs dense₁ with each chosen expert's
  LoRA and leaves its own output unchanged; the ``output.dense`` delta, given those expert
  activations h_e, adds Σ_e w_e·(W₂(h_e − h) + s·B_{e,2}A_{e,2} h_e), so that dense₂'s output is
  the routed mixture Σ_e w_e·dense₂,e(h_e), before BERT's dropout, residual and LayerNorm (the
  mixture is over the two-linear network, as the reference mixes before any residual). The two
  must be adapted together (refused otherwise). LoRA on ``attention.self.{query,key,value}`` and
  ``attention.output.dense``.

A targeted block is an expert block; its linear layers (every Linear / GPT-2 Conv1D in it,
found when the adapter is made) get the expert LoRAs. It must be a feed-forward sub-layer called
with the hidden states alone (a block whose forward takes an attention mask, positions or a cache
is refused). Any other targeted Linear / Conv1D gets plain LoRA of rank
``attn_r`` (so ``targets="all-linear"`` on a model without blocks is LoRA).

Choices, stated (the paper is silent or the reference code decides):

* Defaults from the reference's top-k configuration (README of TUDB-Labs/MixLoRA): E = 8,
  k = 2, r = 8, alpha = 16 (s = alpha / r), router weight ~ N(0, 0.02²) (``router_init_range``),
  ``router_aux_loss_coef`` 0.01 (the README's configurations; the config class's fallback is
  0.001), no jitter noise (the reference's default 0; not offered). The reference's configs use
  LoRA dropout 0.05; the default here is 0 (as paretune's LoRA), set ``dropout=0.05`` for theirs.
* The router runs in the adapter's precision (float32 on a half-precision base), as the
  reference's float32 gate.
* Attention LoRA: rank ``attn_r`` (None: the experts' r; 0: no attention LoRA), scaling
  alpha / attn_r, A kaiming-uniform, B = 0 (:class:`paretune.methods.lora.LoraDelta`). Expert A
  kaiming-uniform(a=√5) per expert (bound 1/√d_in), expert B = 0.
* The load-balance loss is computed per routed layer and averaged over the adapter's routed
  layers (the reference computes one loss over all layers' logits concatenated; the average keeps
  its scale: coef·k at balance). All token positions count (the reference leaves out padding
  positions when it has the attention mask; a delta does not see it).
* Expert outputs are computed by calling the frozen block on the routed tokens (one call on the
  N input rows plus the N·k routed rows, sorted by expert) with forward hooks adding each row's
  expert LoRA to the block's linear outputs: no architecture's forward code is repeated, and other
  adapters inside the block run as they do for the base. A dropout inside the block (GPT-2's
  resid_pdrop) then draws separate masks for the expert rows while training.
* BERT's dense₂ correction goes through dense₂'s frozen weight W₂; other adapters on
  ``output.dense`` see the unrouted activation only.

Not mergeable (routing is per token); per-sample serving is refused (block host).

Trainable: per feed-forward block E·Σ_j r·(d_in,j + d_out,j) + d·E (router; for BERT the dense₂
part is counted on ``output.dense``), per attention projection attn_r·(d_in + d_out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry, geometry_for
from ..core.host import Host
from ..core.registry import register
from ..errors import ParetuneError, TargetError
from .lora import LoraConfig, LoraDelta

# family -> (feed-forward sites, attention projections), whole-name regexes
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": (r"(?:.*\.)?layers\.\d+\.mlp", r"(?:.*\.)?layers\.\d+\.self_attn\.(?:q|k|v|o)_proj"),
    "gpt2": (r"(?:.*\.)?h\.\d+\.mlp", r"(?:.*\.)?h\.\d+\.attn\.c_(?:attn|proj)"),
    "bert": (r"(?:.*\.)?layer\.\d+\.(?:intermediate|output\.dense)",
             r"(?:.*\.)?layer\.\d+\.attention\.(?:self\.(?:query|key|value)|output\.dense)"),
}
_FIRST, _SECOND = "intermediate", "output.dense"
# arguments that mark a block as attention (not a feed-forward sub-layer): masks, positions, caches
_ATTENTION_ARGS = ("attention_mask", "position_embeddings", "position_ids", "past_key_values", "past_key_value",
                   "cache", "layer_past", "encoder_hidden_states")  # BERT's two halves of the feed-forward network


@dataclasses.dataclass
class MixLoraConfig(AdapterConfig):
    """``num_experts`` (E), ``top_k`` (k), expert LoRA ``r`` / ``alpha`` / ``dropout``, attention
    LoRA rank ``attn_r`` (None: r; 0: none), ``aux_loss_coef`` (the load-balance loss weight),
    ``router_init_range`` (std of the router's normal init)."""

    INIT_ONLY = ("router_init_range",)

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_experts: int = 8
    top_k: int = 2
    attn_r: int | None = None
    aux_loss_coef: float = 0.01
    router_init_range: float = 0.02

    def validate(self) -> None:
        self._positive_int("r")
        self._non_negative("alpha")
        self._probability("dropout")
        self._positive_int("num_experts")
        self._positive_int("top_k")
        self._require(self.top_k <= self.num_experts, "top_k", self.top_k,
                      f"it must be at most num_experts={self.num_experts} (each token picks k distinct experts)")
        v = self.attn_r
        self._require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), "attn_r", v,
                      "it must be None (the experts' r), 0 (no attention LoRA) or an integer >= 1")
        self._non_negative("aux_loss_coef")
        self._non_negative("router_init_range")

    @property
    def attention_rank(self) -> int:
        return self.r if self.attn_r is None else self.attn_r


def default_targets(model: nn.Module, config: MixLoraConfig) -> str:
    """The feed-forward sites and (unless ``attn_r=0``) the attention projections of a
    Llama-style, GPT-2 or BERT-style model, as one regex."""
    from ..core.inject import iter_modules

    names = [n for n, _ in iter_modules(model) if n]
    for ffn, attn in FAMILIES.values():
        if any(re.fullmatch(ffn, n) for n in names):
            return f"(?:{ffn})|(?:{attn})" if config.attention_rank > 0 else ffn
    raise TargetError(
        f"mixlora: no default feed-forward layers for a {type(model).__name__} (known: Llama-style, GPT-2 and "
        "BERT-style module names). Pass targets=...: each feed-forward sub-layer (a module called with the hidden "
        "states alone, e.g. 'model.layers.0.mlp') and, for LoRA, the attention projections."
    )


# -- roles ---------------------------------------------------------------------------------------
def _partner(geometry: Geometry, own: str, other: str) -> str | None:
    """For BERT's split feed-forward network: the name of the other half when ``geometry`` is
    the half named ``own`` and the model has a Linear ``other`` beside it; else None."""
    name = geometry.name
    if geometry.root is None or not (name == own or name.endswith("." + own)):
        return None
    prefix = name[: len(name) - len(own)]
    if prefix.endswith("attention."):
        return None
    try:
        module = geometry.root.get_submodule(prefix + other)
    except AttributeError:
        return None
    return prefix + other if module is not None else None


def role_of(geometry: Geometry) -> str:
    """"ffn" (a whole feed-forward block), "first" / "second" (BERT's intermediate / output.dense),
    or "lora" (any other Linear / Conv1D)."""
    if geometry.kind == "block":
        return "first" if _partner(geometry, _FIRST, _SECOND) else "ffn"
    return "second" if _partner(geometry, _SECOND, _FIRST) else "lora"


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, Host):
        return module.kind in ("linear", "conv1d")
    g = geometry_for(module)
    return g is not None and g.kind in ("linear", "conv1d")


def inner_linears(block: nn.Module) -> list[tuple[str, int, int]]:
    """(path, d_in, d_out) of every Linear / Conv1D in ``block`` (a hosted one counts as its base),
    in registration order."""
    out: list[tuple[str, int, int]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module._modules.items():
            if child is None:
                continue
            path = f"{prefix}.{child_name}" if prefix else child_name
            if _is_linear(child):
                g = child.geometry if isinstance(child, Host) else geometry_for(child)
                out.append((path, g.d_in, g.d_out))
            elif isinstance(child, Host):
                walk(path, child.base)
            else:
                walk(path, child)

    walk("", block)
    return out


def _check_expert_block(geometry: Geometry) -> list[tuple[str, int, int]]:
    block = geometry.base
    linears = inner_linears(block)
    try:
        params = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover
        params = []
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    attention = any(p.name in _ATTENTION_ARGS for p in params)
    if len(required) > 1 or attention or not linears:
        raise TargetError(
            f"mixlora: {geometry.name or type(block).__name__} ({type(block).__name__}) is not a feed-forward "
            "sub-layer called with the hidden states alone (with Linear layers inside); target the feed-forward "
            "blocks (e.g. model.layers.N.mlp) and the attention projections, not whole attention blocks."
        )
    return linears


def _expert_lora(owner: nn.Module, shapes: list[tuple[str, int, int]], config: MixLoraConfig,
                 like: torch.Tensor) -> None:
    """Per linear layer j: A_j (E, r, d_in) kaiming-uniform per expert, B_j (E, d_out, r) zero."""
    dtype = adapter_dtype(like)
    owner.lora_A = nn.ParameterDict()
    owner.lora_B = nn.ParameterDict()
    owner.expert_keys = []
    E, r = config.num_experts, config.r
    for path, d_in, d_out in shapes:
        key = path.replace(".", "_")
        a = torch.empty(E, r, d_in, dtype=dtype, device=like.device)
        for e in range(E):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        owner.lora_A[key] = nn.Parameter(a)
        owner.lora_B[key] = nn.Parameter(torch.zeros(E, d_out, r, dtype=dtype, device=like.device))
        owner.expert_keys.append((key, path))


@register(
    "mixlora",
    config=MixLoraConfig,
    summary="MixLoRA (Li et al. 2024): each feed-forward block becomes E LoRA experts (top-k router, "
            "load-balance loss) + LoRA on the attention projections",
    formula="feed-forward block: E·Σ_j r·(d_in,j + d_out,j) + d·E; attention projection: attn_r·(d_in + d_out)",
    kinds=("linear", "conv1d", "block"),
    default_targets=default_targets,
)
class MixLoraDelta(Delta):
    """One site of a MixLoRA adapter; ``role`` says which (see :func:`role_of`)."""

    mergeable = False

    def __init__(self, geometry: Geometry, config: MixLoraConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.role = role_of(geometry)
        self.scaling = config.alpha / config.r
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._aux: torch.Tensor | None = None
        self.load: torch.Tensor | None = None  # fraction of the routed slots per expert, last forward
        w = geometry.weight
        if self.role == "lora":
            if config.attention_rank == 0:
                raise TargetError(
                    f"mixlora: attn_r=0 (no attention LoRA) but {geometry.name} is a Linear target that is not a "
                    "feed-forward half; remove it from targets or give attn_r >= 1."
                )
            lora = LoraConfig(r=config.attention_rank, alpha=config.alpha, dropout=config.dropout)
            self.part = LoraDelta(geometry, lora, layer=layer)
            return
        if self.role == "second":
            self.key = geometry.name[: len(geometry.name) - len(_SECOND)]
            _expert_lora(self, [("dense", self.d_in, self.d_out)], config, w)
            return
        shapes = _check_expert_block(geometry)
        if self.role == "first":
            self.key = geometry.name[: len(geometry.name) - len(_FIRST)]
        _expert_lora(self, shapes, config, w)
        self.router = nn.Parameter(torch.empty(config.num_experts, shapes[0][1], dtype=adapter_dtype(w),
                                               device=w.device))
        nn.init.normal_(self.router, mean=0.0, std=config.router_init_range)

    # -- bank: the link between BERT's halves, the number of routed layers ------------------------
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: MixLoraConfig) -> Bank:
        roles = [role_of(g) for g in geometries]
        names = {g.name for g in geometries}
        for g, role in zip(geometries, roles):
            if role in ("first", "second"):
                other = _partner(g, _FIRST, _SECOND) if role == "first" else _partner(g, _SECOND, _FIRST)
                if other not in names:
                    raise TargetError(
                        f"mixlora: {g.name} is one half of a BERT-style feed-forward network; adapt {other} too "
                        "(the default targets take both), since the experts span both halves."
                    )
        return Bank(routers=max(1, sum(r in ("ffn", "first") for r in roles)), mailbox={})

    # -- routing ---------------------------------------------------------------------------------
    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Route N tokens (rows of ``x2``): (token of each routed slot, its weight, slots per
        expert), the slots sorted by expert. Records :attr:`load` and, while training, the
        load-balance loss."""
        E, k = self.config.num_experts, self.config.top_k
        logits = F.linear(x2.to(self.router.dtype), self.router)
        probs = logits.softmax(dim=-1)
        top_w, top_i = probs.topk(k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        flat = top_i.reshape(-1)
        counts = torch.bincount(flat, minlength=E)
        self.load = (counts.float() / max(1, flat.numel())).detach()
        if self.training and torch.is_grad_enabled():
            f = counts.to(probs.dtype) / max(1, x2.shape[0])
            self._aux = self.config.aux_loss_coef * E * (f * probs.mean(dim=0)).sum() / self.bank.routers
        order = torch.argsort(flat, stable=True)
        return order // k, top_w.reshape(-1)[order], counts.tolist()

    def _lora_rows(self, key: str, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """s·B_e A_e drop(row) for rows sorted by expert (``counts`` rows each)."""
        A, B = self.lora_A[key], self.lora_B[key]
        pieces = []
        for e, part in enumerate(rows.split(counts)):
            if part.shape[0] == 0:
                continue
            h = part.to(A.dtype)
            if self.drop is not None:
                h = self.drop(h)
            pieces.append((h @ A[e].T) @ B[e].T)
        if not pieces:
            return rows.new_zeros(0, B.shape[1], dtype=A.dtype)
        return torch.cat(pieces) * self.scaling

    @contextlib.contextmanager
    def _experts_on(self, n: int, counts: list[int]) -> Iterator[None]:
        """While the block runs on [N input rows; routed rows sorted by expert]: each linear's
        output gets its routed rows' expert LoRA."""
        handles = []

        def hook_for(key: str):
            def hook(module, inputs, output):
                x = inputs[0] if inputs else None
                if x is None or x.numel() // x.shape[-1] != n + sum(counts):
                    raise ParetuneError(
                        f"mixlora: the linear layers of {self.geometry.name} do not see one row per token; an "
                        "expert block must apply its linear layers token by token."
                    )
                rows = x.reshape(-1, x.shape[-1])[n:]
                add = self._lora_rows(key, rows, counts)
                flat = output.reshape(-1, output.shape[-1])
                flat = torch.cat([flat[:n], flat[n:] + add.to(flat.dtype)])
                return flat.view(output.shape)
            return hook

        try:
            for key, path in self.expert_keys:
                module = self.geometry.base.get_submodule(path)
                handles.append(module.register_forward_hook(hook_for(key)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        """(token, weight, block output of the N input rows, per expert counts, block output of
        the routed rows)."""
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        tokens, weights, counts = self.route(x2)
        rows = torch.cat([x2, x2[tokens]])
        with self._experts_on(n, counts):
            out = self.geometry.base(rows)
        return tokens, weights, out[:n], counts, out[n:]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.role == "lora":
            return self.part(x, base_out)
        if self.role == "second":
            return self._second(x, base_out)
        tokens, weights, plain, counts, routed = self._experts(x)
        if self.role == "first":  # BERT's intermediate: hand the expert activations to output.dense
            self.bank.mailbox[self.key] = (tokens, weights, counts, plain, routed)
            return base_out
        diff = (routed - plain[tokens]).to(weights.dtype) * weights[:, None]
        change = torch.zeros(plain.shape, dtype=diff.dtype, device=diff.device).index_add(0, tokens, diff)
        return base_out + change.view(base_out.shape).to(base_out.dtype)

    def _second(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        got = self.bank.mailbox.pop(self.key, None)
        if got is None:  # its intermediate did not run (the adapter was off there)
            return base_out
        tokens, weights, counts, plain, routed = got
        n = plain.shape[0]
        if base_out.numel() // base_out.shape[-1] != n:
            raise ParetuneError(f"mixlora: {self.geometry.name} got {base_out.numel() // base_out.shape[-1]} rows "
                                f"but its intermediate routed {n}.")
        w2 = self.geometry.matrix()
        step = F.linear((routed - plain[tokens]).to(w2.dtype), w2).to(weights.dtype)
        step = step + self._lora_rows("dense", routed, counts).to(weights.dtype)
        change = torch.zeros(n, self.d_out, dtype=weights.dtype, device=weights.device)
        change = change.index_add(0, tokens, step * weights[:, None])
        return base_out + change.view(base_out.shape).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.part.fused_forward(x) if self.role == "lora" else None

    def alone_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.part.alone_forward(x, base_out) if self.role == "lora" else self.forward(x, base_out)

    def aux_loss(self) -> torch.Tensor | None:
        aux, self._aux = self._aux, None
        return aux

    # -- counts ----------------------------------------------------------------------------------
    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: MixLoraConfig) -> int:
        """An attention projection's LoRA (:meth:`layer_formula` tells the feed-forward sites apart)."""
        return config.attention_rank * (d_in + d_out)

    @classmethod
    def layer_formula(cls, geometry: Geometry, config: MixLoraConfig) -> int:
        role = role_of(geometry)
        E, r = config.num_experts, config.r
        if role == "lora":
            return cls.trainable_formula(geometry.d_out, geometry.d_in, config)
        if role == "second":
            return E * r * (geometry.d_in + geometry.d_out)
        shapes = inner_linears(geometry.base)
        return E * sum(r * (d_in + d_out) for _, d_in, d_out in shapes) + shapes[0][1] * E

    def extra_repr(self) -> str:
        c = self.config
        if self.role == "lora":
            return f"{self.method}: LoRA r={c.attention_rank}"
        return f"{self.method}: {self.role}, E={c.num_experts}, k={c.top_k}, r={c.r}"
