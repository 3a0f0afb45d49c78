"""Relaxed Recursive Transformers: tie a model's L layers into K shared blocks looped L/K times,
with a per-depth LoRA that relaxes the tying.

Paper: Bae, Fisch, Harutyunyan, Ji, Kim and Schuster, "Relaxed Recursive Transformers: Effective
Parameter Sharing with Layer-wise LoRA" (ICLR 2025, arXiv:2410.20672).

Looping ("CYCLE" sharing in the paper): depth ``ℓ`` (0-based) runs block ``ℓ mod K``, so the K
blocks run in order, then again, L/K times in all. Initialisation of block ``b``:

* ``"stepwise"``: the original layer ``b · L/K`` (every (L/K)-th layer; the paper's Stepwise);
* ``"average"``: the element-wise mean of the layers tied to it, ``{b, b + K, b + 2K, ...}``
  (the paper's Average).

Relaxation (``lora_rank = r > 0``): at each depth ``ℓ``, every Linear weight ``W`` of the block
becomes ``W_block + B_ℓ A_ℓ`` with ``B_ℓ = U_r Σ_r``, ``A_ℓ = V_rᵀ`` from the truncated SVD of
the residual ``W_ℓ − W_block`` (the paper's SVD initialisation; computed in float32, float64 for a
float64 model), so with ``r ≥ min(out, in)`` the
original model is recovered exactly (up to float rounding). The block's other parameters (the
RMSNorm scales, and biases where a model has them) are vectors; a relaxed model gives each depth
its own dense difference ``γ_ℓ − γ_block`` for them (a few thousand numbers per layer; without it
full rank could not recover the original, and the paper is silent on norms). With ``r = 0``
nothing is added: the pure Recursive Transformer, equal to the original model with its layers
replaced by the chosen blocks.

Design: the K blocks are ordinary decoder layers, each *shared* by the L/K :class:`DepthLayer`
modules that stand in ``model.model.layers``. A DepthLayer holds its depth's LoRA factors and
vector differences (never the shared block), and runs the block through
``torch.func.functional_call`` with the block's weights replaced by ``W_block + B_ℓ A_ℓ`` for
that call (forming ``B_ℓ A_ℓ`` costs r·out·in multiply-adds per call, small beside a batch of
tokens; gradients reach both the shared weights and the factors). Each call also sets the
attention's ``layer_idx`` to the depth, so a key/value cache keeps one entry per depth and
generation works. Parameter counts (``count_unique``) count each shared tensor once.

Supported: Llama-style decoder models whose layers sit in ``model.model.layers`` (Llama,
SmolLM2, Mistral, Qwen2, ...), all layers of one attention type.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from .state_folder import load_unique_state, read_state_meta, write_state_folder
from ..errors import AdapterFileError, ConfigError

FORMAT = "paretune-recursive"
VERSION = 1


def _key(name: str) -> str:
    return name.replace(".", "__")


class DepthLayer(nn.Module):
    """One depth of a recursive model: the shared ``block`` (one decoder layer, shared with the
    other depths that loop it) plus this depth's relaxation: LoRA factors ``lora_A[n]`` (r, in)
    and ``lora_B[n]`` (out, r) for each Linear ``n`` of the block, and ``vector_delta[n]`` for
    each of its other parameters. ``forward`` takes and returns what the block does."""

    def __init__(self, block: nn.Module, depth: int, block_index: int):
        super().__init__()
        self.block = block
        self.depth = depth
        self.block_index = block_index
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.vector_delta = nn.ParameterDict()
        self._names: dict[str, str] = {}  # ParameterDict key -> parameter name inside the block

    def add_lora(self, weight_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        k = _key(weight_name)
        self._names[k] = weight_name
        self.lora_A[k] = nn.Parameter(a)
        self.lora_B[k] = nn.Parameter(b)

    def add_vector(self, param_name: str, delta: torch.Tensor) -> None:
        k = _key(param_name)
        self._names[k] = param_name
        self.vector_delta[k] = nn.Parameter(delta)

    def effective(self) -> dict[str, torch.Tensor]:
        """The block parameters this depth runs with, where they differ from the shared ones."""
        params = dict(self.block.named_parameters())
        out = {}
        for k, a in self.lora_A.items():
            name = self._names[k]
            out[name] = params[name] + self.lora_B[k] @ a
        for k, d in self.vector_delta.items():
            name = self._names[k]
            out[name] = params[name] + d
        return out

    def forward(self, *args, **kwargs):
        idx_modules = [m for m in self.block.modules() if hasattr(m, "layer_idx")]
        saved = [m.layer_idx for m in idx_modules]
        for m in idx_modules:
            m.layer_idx = self.depth
        try:
            overrides = self.effective()
            if not overrides:
                return self.block(*args, **kwargs)
            return functional_call(self.block, overrides, args, kwargs, strict=False)
        finally:
            for m, v in zip(idx_modules, saved):
                m.layer_idx = v

    def extra_repr(self) -> str:
        rank = next(iter(self.lora_A.values())).shape[0] if len(self.lora_A) else 0
        return f"depth={self.depth}, block={self.block_index}, lora_rank≤{rank}"


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"make_recursive works on Llama-style decoder models whose layers are in model.model.layers "
                          f"(Llama, SmolLM2, Mistral, Qwen2); a {type(model).__name__} has no such list.")
    return layers


def is_recursive(model: nn.Module) -> bool:
    try:
        return any(isinstance(m, DepthLayer) for m in _layers(model))
    except ConfigError:
        return False


def _linear_weight_names(block: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _check(model: nn.Module, num_blocks, init, lora_rank) -> tuple[nn.ModuleList, int]:
    from ..core.host import Host

    layers = _layers(model)
    n = len(layers)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1 or n % num_blocks:
        divisors = [k for k in range(1, n + 1) if n % k == 0]
        raise ConfigError(f"num_blocks={num_blocks!r}: the model has {n} layers; give a divisor of {n} "
                          f"({', '.join(map(str, divisors))}).")
    if init not in ("average", "stepwise"):
        raise ConfigError(f"init={init!r}: give 'average' (mean of the tied layers) or 'stepwise' "
                          "(every (L/K)-th layer).")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ConfigError(f"lora_rank={lora_rank!r} must be an integer ≥ 0 (0: no per-depth LoRA).")
    if any(isinstance(m, DepthLayer) for m in layers):
        raise ConfigError("make_recursive: the model is already recursive; convert the original model.")
    if any(isinstance(m, Host) for m in model.modules()):
        raise ConfigError("make_recursive: the model carries adapters; make it recursive first, then adapt it "
                          "(or merge the adapters with paretune.merge and unload them).")
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if types and len(set(types)) > 1:
        raise ConfigError(f"make_recursive: the layers have different attention types ({sorted(set(types))}); "
                          "tying them into shared blocks is not supported.")
    return layers, n


@torch.no_grad()
def make_recursive(model: nn.Module, num_blocks: int, init: str = "average", lora_rank: int = 0, *,
                   _zeros: bool = False) -> nn.Module:
    """Turn ``model`` (in place) into a (Relaxed) Recursive Transformer with ``num_blocks`` (K)
    shared blocks looped L/K times, initialised by ``init`` (``"average"`` or ``"stepwise"``), with
    a per-depth LoRA of rank ``lora_rank`` (0: none; each matrix's rank is capped at
    min(out, in), where it recovers the original exactly) initialised from the SVD of the
    residuals. Returns the model. See the module docstring for the formulas and the design."""
    layers, n = _check(model, num_blocks, init, lora_rank)
    k = num_blocks
    loops = n // k
    originals = list(layers)
    orig_params = [{name: p.detach().clone() for name, p in layer.named_parameters()} for layer in originals]
    blocks = []
    for b in range(k):
        if init == "stepwise":
            block = originals[b * loops]
        else:
            block = originals[b]
            tied = [orig_params[d] for d in range(b, n, k)]
            for name, p in block.named_parameters():
                p.copy_(torch.stack([t[name].double() for t in tied]).mean(0).to(p.dtype))
        blocks.append(block)
    linear_names = _linear_weight_names(blocks[0])
    from ..progress import bar as progress_bar

    new_layers = []
    for d in progress_bar(range(n), desc="make_recursive", unit="layer", leave=False, enabled=not (lora_rank == 0 or n < 8)):
        block = blocks[d % k]
        depth = DepthLayer(block, d, d % k)
        if lora_rank > 0:
            shared = dict(block.named_parameters())
            for name, p in shared.items():
                if _zeros:
                    delta = torch.zeros_like(p)
                else:
                    delta = orig_params[d][name].to(p.device) - p.detach()
                if name in linear_names:
                    r = min(lora_rank, *p.shape)
                    if _zeros:
                        a = torch.zeros(r, p.shape[1], dtype=p.dtype, device=p.device)
                        bb = torch.zeros(p.shape[0], r, dtype=p.dtype, device=p.device)
                    else:
                        work = torch.float64 if p.dtype == torch.float64 else torch.float32
                        u, s, vh = torch.linalg.svd(delta.to(work), full_matrices=False)
                        bb = (u[:, :r] * s[:r]).to(p.dtype)
                        a = vh[:r].to(p.dtype).contiguous()
                    depth.add_lora(name, a, bb)
                else:
                    depth.add_vector(name, delta.clone())
        new_layers.append(depth)
    for i, depth in enumerate(new_layers):
        layers[i] = depth
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.paretune_recursive = {"num_blocks": k, "init": init, "lora_rank": lora_rank}
    return model


def count_unique(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once (``model.parameters()`` already yields a
    shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def recursive_counts(model: nn.Module) -> dict[str, int]:
    """``total`` (unique parameters), ``shared_blocks`` (the K blocks), ``relaxation`` (all
    per-depth LoRA factors and vector differences) and ``other`` (embeddings, final norm, head)."""
    layers = _layers(model)
    blocks = {id(m.block): m.block for m in layers if isinstance(m, DepthLayer)}
    shared = sum(p.numel() for b in blocks.values() for p in b.parameters())
    relax = sum(p.numel() for m in layers if isinstance(m, DepthLayer)
                for pd in (m.lora_A, m.lora_B, m.vector_delta) for p in pd.values())
    total = count_unique(model)
    return {"total": total, "shared_blocks": shared, "relaxation": relax, "other": total - shared - relax}


def save_recursive(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a recursive model to the folder ``path``: ``recursive.json`` (number of blocks and
    layers, init, LoRA rank) and ``model.safetensors`` (every tensor once: the shared blocks,
    the per-depth factors and the rest of the model). The folder appears complete or not at all."""
    if not is_recursive(model):
        raise ConfigError("save_recursive: the model is not recursive; call make_recursive first.")
    info = getattr(model.config, "paretune_recursive", None)
    if not info:
        raise ConfigError("save_recursive: the model's config lacks its recursive settings; build it with "
                          "make_recursive.")
    return write_state_folder(model, path, "recursive.json",
                              {"format": FORMAT, "version": VERSION, "num_layers": len(_layers(model)), **info})


def load_recursive(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_recursive` into ``model``, the original (not yet
    recursive) model of the same architecture: it is made recursive with the saved settings
    (no SVD is computed) and every tensor is read from the file. Returns the model."""
    path = Path(path)
    meta = read_state_meta(path, "recursive.json", FORMAT, "recursive model description",
                           "paretune.compress.recursive.save_recursive")
    n = len(_layers(model))
    if n != meta["num_layers"]:
        raise AdapterFileError(f"{path} holds a recursive model of {meta['num_layers']} layers, but this model has "
                               f"{n}; load it into the model it was made from.")
    make_recursive(model, meta["num_blocks"], meta["init"], meta["lora_rank"], _zeros=True)
    load_unique_state(model, path / "model.safetensors", meta.get("aliases", {}))
    return model
