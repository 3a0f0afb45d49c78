"""MoS, Mixture of Shards (Wang, Chen, Chen, Dong, Xue, Jiang, Kong & Wu, ICLR 2025, "MoS:
Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards", arXiv 2410.00938).

Every adapted layer has a LoRA update of rank ``r``, ΔW = (α / r)·B·diag(s)·A, but its rank
vectors (the rows of A, the columns of B) are not its own parameters: each one is the
concatenation of ``shards`` (the paper's l) shards of length d / l, drawn from trainable pools that
all layers share. The paper's four differentiation strategies, as implemented here:

* subset selection: each layer takes, through its own index matrix, a subset of the shards of the
  global pool (the paper's router "R");
* pair dissociation: A and B have separate pools and separate index matrices, so the rows of A
  and the columns of B are not paired across layers;
* vector sharding: a rank vector is the concatenation of l shards, each selected on its own;
* shard privatization: the last ``private_r`` rank vectors of every layer are made of shards that
  only this layer uses (held on the layer itself).

A random scaling vector s (one number per rank, drawn from N(``init_mean``, ``init_std``) and
divided by ``init_mean``, frozen) multiplies the rows of A. ΔW is materialised per layer, so MoS
merges like LoRA and has an exact LoRA form (:meth:`as_lora`): PEFT export and the gathered
per-sample path work.

Trainable size: the pools are sized to the budget of LoRA at rank ``equivalent_r`` (e) on the same
layers: for every distinct input width D, the A pool holds (e − private_r)·n_D·l shards, n_D the
number of adapted layers whose d_in is D (likewise one B pool per distinct output width), and each
layer owns private_r·l shards of A and of B. With widths divisible by l the adapter trains exactly
e·Σ(d_in + d_out), LoRA's count at rank e, while every layer has rank r: the paper's "equivalent
rank" (the authors' ``valid_param_lora_r``). The paper's headline setting, r = 64 at the budget of
e = 8, is 1/8 of LoRA's count at rank 64 (the "about 8x parameter savings").

What follows the authors' code (github.com/Forence1999/MoS, ``modules/Tied_LoRA.py``), where the
paper text available to this implementation does not pin it:

* the index matrices are drawn once at random and kept fixed (the code's ``torch.randperm`` of the
  shared shards, first (r − private_r)·l taken, without repetition inside a layer; no trained
  router), independently for A and for B; shard j·l + i of a layer's selection fills position i
  of its rank vector j (the code's ``transform_chunks``); shared rank vectors come first, private
  ones last;
* the pool of A starts kaiming-uniform on ±1/√d_in (the code's ``kaiming_uniform_`` with
  a = √5 and fan = shard length · l = d_in), B's pool and private shards at zero, so ΔW = 0 at the
  start; the private shards of A start as the pool does;
* the scaling vector is frozen, s = N(init_mean, init_std) / init_mean (the code's
  ``lora_A_vec · lora_A_anti_vec``); its config default is mean 1 with no spread (s = 1), the
  defaults used here (``init_std = 0``);
* scaling α / r with α = 16, r = 64 and dropout 0.1 on the branch's input: the code's
  ``lora_alpha``, ``lora_r`` and ``lora_dropout`` defaults (finetune_trainer.py); ``private_r``
  = 1, its ``valid_param_private_r`` default.

Choices made here where neither says (stated):

* Pools are grouped by width, not by module name: the code builds one pool per projection type
  (q_proj, k_proj, ...) of a Llama; here one A pool per distinct d_in and one B pool per distinct
  d_out among the adapted layers, so layers of equal width share shards whatever their role, and
  the method runs on any architecture. On a Llama this shares more than the code does (e.g. q_proj
  and o_proj, both hidden × hidden, draw from the same pools); the trainable count is the same.
* A width that l does not divide gets shards of length ⌈D / l⌉ and its vectors are cut to D (the
  last shard's tail is unused); the code requires l to divide every width. Then the count is
  slightly above LoRA's at rank e (the formula counts the padded shards).
* When a layer needs more shared shards than its pool has ((r − private_r)·l > (e − private_r)·
  n_D·l: few layers of that width, as on small models), the selection goes through successive
  random permutations of the pool, so a shard repeats inside the layer only once all have been
  used; with enough shards it is exactly the code's draw.
* The random draws use CPU generators seeded from ``seed`` (the pools) and from ``seed`` and the
  layer's index (its index matrices, private shards and scaling vector). The index matrices and
  the scaling vectors are saved with the adapter (small integer and float tensors), so a load does
  not depend on the draw and ``seed``, ``init_mean`` and ``init_std`` only change the start
  (``INIT_ONLY``). The pools are saved once, with the adapter's first layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from typing import ClassVar

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import SharedInBank
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.inject import targets_by_model_type
from ..core.lowrank import LowRankDelta
from ..core.registry import register
from ..errors import AdapterFileError

# model_type -> default targets: every projection of the attention and MLP blocks (the authors'
# ``lora_modules all``: q, k, v, o, gate, up, down of a Llama)
_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}


def default_targets(model: nn.Module) -> list[str]:
    """Every attention and MLP projection of a Llama-, BERT- or GPT-2-style model."""
    return list(targets_by_model_type(
        model, ARCHITECTURES, "mos",
        "Pass targets=[...] (the linear layers to adapt, e.g. the attention and MLP projections) "
        "or targets='all-linear'."))


@dataclasses.dataclass
class MosConfig(AdapterConfig):
    """``r``: rank of every layer's ΔW; ``equivalent_r``: the trainable budget, that of LoRA at this
    rank on the same layers (sets the pool sizes); ``shards``: l, shards per rank vector;
    ``private_r``: rank vectors per layer made of the layer's own shards; ``alpha``: ΔW is scaled
    by alpha / r; ``dropout``: on the branch's input; ``init_mean`` / ``init_std``: the frozen random
    scaling s = N(init_mean, init_std) / init_mean per rank; ``seed``: the pools, index matrices,
    private shards and scalings."""

    INIT_ONLY: ClassVar[tuple[str, ...]] = ("seed", "init_mean", "init_std")  # the file holds the draws
    r: int = 64
    equivalent_r: int = 8
    shards: int = 4
    private_r: int = 1
    alpha: float = 16.0
    dropout: float = 0.1
    init_mean: float = 1.0
    init_std: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("r")
        self._positive_int("equivalent_r")
        self._positive_int("shards")
        p = self.private_r
        self._require(isinstance(p, int) and not isinstance(p, bool) and p >= 0, "private_r", p,
                      "it must be an integer >= 0")
        self._require(p <= self.r, "private_r", p, f"it cannot exceed the rank r={self.r}")
        self._require(p <= self.equivalent_r, "private_r", p,
                      f"the private shards come out of the budget: choose private_r <= equivalent_r={self.equivalent_r}")
        self._require(p < self.equivalent_r or p == self.r, "private_r", p,
                      f"with private_r = equivalent_r = {p} nothing is left for the shared pools, which the other "
                      f"r - private_r = {self.r - p} rank vectors need; choose private_r < equivalent_r (or r = private_r)")
        self._require(p < self.r or p == self.equivalent_r, "equivalent_r", self.equivalent_r,
                      f"with private_r = r = {p} every rank vector is private and the shared pools would be unused; "
                      f"choose equivalent_r = private_r = r, or private_r < r")
        self._non_negative("alpha")
        self._probability("dropout")
        m = self.init_mean
        self._require(isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m != 0,
                      "init_mean", m, "it must be a finite non-zero number (the scaling divides by it)")
        self._non_negative("init_std")
        self._require(math.isfinite(self.init_std), "init_std", self.init_std, "it must be finite")
        self._seed("seed")


def shard_length(width: int, shards: int) -> int:
    """Length of one shard of a width-``width`` vector cut in ``shards`` pieces (⌈width / shards⌉)."""
    return -(-width // shards)


def pool_rows(layers_of_width: int, config: MosConfig) -> int:
    """Shards in the shared pool of one width: (equivalent_r − private_r) · layers of that width · l."""
    return (config.equivalent_r - config.private_r) * layers_of_width * config.shards


def _key(width: int) -> str:
    return f"d{width}"


def layer_seed(seed: int, layer: int) -> int:
    """The seed of one layer's draws (index matrices, private shards, scaling), from the adapter's
    seed and the layer's index (SHA-256, so nearby seeds give unrelated draws)."""
    digest = hashlib.sha256(f"mos:{seed}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def select(rows: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` shard indices out of ``rows``: the first ``count`` entries of successive random
    permutations of range(rows) (one permutation, as the authors' randperm, when count <= rows)."""
    parts, have = [], 0
    while have < count:
        parts.append(torch.randperm(rows, generator=generator))
        have += rows
    return torch.cat(parts)[:count] if parts else torch.zeros(0, dtype=torch.long)


def _uniform(shape: tuple[int, int], bound: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


@register(
    "mos",
    config=MosConfig,
    summary="MoS (Wang et al. 2024): LoRA of rank r whose rank vectors are concatenations of l shards "
            "selected per layer from pools shared by all layers (separate for A and B), some private",
    formula="private_r·l·(⌈d_in/l⌉ + ⌈d_out/l⌉) per layer + shared pools (equivalent_r − private_r)·l·"
            "Σ_layers(⌈d_in/l⌉ + ⌈d_out/l⌉): equivalent_r·(d_in + d_out) per layer when l divides the widths",
    kinds=("linear", "conv1d"),
    default_targets=default_targets,
)
class MosDelta(SharedInBank, LowRankDelta):
    """One layer's view of the pools: its index matrices into the shared A and B pools (buffers),
    its private shards (parameters) and its frozen scaling vector; the pools live in the bank."""

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: MosConfig) -> Bank:
        weight = geometries[0].weight
        dtype, device = adapter_dtype(weight), weight.device
        gen = torch.Generator().manual_seed(config.seed)
        bank = Bank()
        bank.pool_a = nn.ParameterDict()
        bank.pool_b = nn.ParameterDict()
        for width, n in sorted(Counter(g.d_in for g in geometries).items()):
            rows = pool_rows(n, config)
            if rows:
                shards = _uniform((rows, shard_length(width, config.shards)), 1 / math.sqrt(width), gen)
                bank.pool_a[_key(width)] = nn.Parameter(shards.to(device, dtype))
        for width, n in sorted(Counter(g.d_out for g in geometries).items()):
            rows = pool_rows(n, config)
            if rows:
                zeros = torch.zeros(rows, shard_length(width, config.shards), dtype=dtype, device=device)
                bank.pool_b[_key(width)] = nn.Parameter(zeros)
        return bank

    def __init__(self, geometry: Geometry, config: MosConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): pools for this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype, device = adapter_dtype(w), w.device
        self.scaling = config.alpha / config.r
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        l, p = config.shards, config.private_r
        shared = config.r - p
        self.len_in, self.len_out = shard_length(self.d_in, l), shard_length(self.d_out, l)
        gen = torch.Generator().manual_seed(layer_seed(config.seed, layer))
        idx_a = idx_b = torch.zeros(0, l, dtype=torch.long)
        if shared:
            rows_a = bank.pool_a[_key(self.d_in)].shape[0]
            rows_b = bank.pool_b[_key(self.d_out)].shape[0]
            idx_a = select(rows_a, shared * l, gen).view(shared, l)
            idx_b = select(rows_b, shared * l, gen).view(shared, l)
        self.register_buffer("idx_a", idx_a.to(device), persistent=False)
        self.register_buffer("idx_b", idx_b.to(device), persistent=False)
        self.private_a = nn.Parameter(_uniform((p * l, self.len_in), 1 / math.sqrt(self.d_in), gen).to(device, dtype))
        self.private_b = nn.Parameter(torch.zeros(p * l, self.len_out, dtype=dtype, device=device))
        if config.init_std > 0:
            s = torch.empty(config.r).normal_(config.init_mean, config.init_std, generator=gen) / config.init_mean
        else:
            s = torch.ones(config.r)
        self.register_buffer("scale", s.to(device, dtype), persistent=False)

    # -- the low-rank form -------------------------------------------------------------------
    def _vectors(self, pool: nn.ParameterDict, width: int, idx: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
        """(r, width): the shared rank vectors (pool shards by ``idx``, l per vector, concatenated)
        then the private ones, each cut to ``width``."""
        parts = []
        if idx.numel():
            parts.append(pool[_key(width)][idx].reshape(idx.shape[0], -1))
        if private.numel():
            parts.append(private.reshape(self.config.private_r, -1))
        return torch.cat(parts)[:, :width]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._vectors(self.bank.pool_a, self.d_in, self.idx_a, self.private_a)
        b = self._vectors(self.bank.pool_b, self.d_out, self.idx_b, self.private_b)
        return self.scale.to(a.dtype)[:, None] * a, b.t()

    # -- counts --------------------------------------------------------------------------------
    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: MosConfig) -> int:
        """The layer's private shards: private_r·l shards of A (length ⌈d_in/l⌉) and of B."""
        l = config.shards
        return config.private_r * l * (shard_length(d_in, l) + shard_length(d_out, l))

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: MosConfig) -> int:
        """The shared pools: per distinct d_in, (equivalent_r − private_r)·n·l shards of ⌈d_in/l⌉
        (n layers of that width); the same for d_out."""
        l = config.shards
        ins = Counter(d_in for _, d_in in shapes)
        outs = Counter(d_out for d_out, _ in shapes)
        return (sum(pool_rows(n, config) * shard_length(w, l) for w, n in ins.items())
                + sum(pool_rows(n, config) * shard_length(w, l) for w, n in outs.items()))

    # -- saving ----------------------------------------------------------------------------------
    def _stored(self) -> dict[str, torch.Tensor]:
        """Private shards, index matrices and scaling of the layer; the pools with the first layer."""
        out = super()._stored()  # the private shards (the pools sit in ParameterDicts, not shared_names)
        out.update(idx_a=self.idx_a, idx_b=self.idx_b, scale=self.scale)
        if self.layer == 0:  # the pools, once for the adapter
            out.update({f"pool_a.{k}": v for k, v in self.bank.pool_a.items()})
            out.update({f"pool_b.{k}": v for k, v in self.bank.pool_b.items()})
        return out

    def check_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Names and shapes, and the index matrices point into this model's pools."""
        super().check_stored(state, where)
        for name, pool, width in (("idx_a", self.bank.pool_a, self.d_in), ("idx_b", self.bank.pool_b, self.d_out)):
            idx = state[name]
            if idx.numel():
                rows = pool[_key(width)].shape[0]
                if idx.dtype.is_floating_point or int(idx.min()) < 0 or int(idx.max()) >= rows:
                    raise AdapterFileError(
                        f"{where}.{name}: shard indices must be integers in [0, {rows}) for this model's pool "
                        f"of width {width}; the file was written for other targets or another base model."
                    )

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, r={c.r} (shared {c.r - c.private_r}, "
                f"private {c.private_r}), l={c.shards}, equivalent_r={c.equivalent_r}")
