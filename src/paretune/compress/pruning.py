"""Unstructured pruning of Linear / GPT-2 Conv1D weights, kept by masks, and retraining after it.

Three scores, each removing the lowest-scoring weights:

* ``"magnitude"``: per layer, each targeted layer keeps its largest ``|W_ij|`` (Han et al. 2015,
  "Learning both Weights and Connections for Efficient Neural Networks"; layer-wise as Zhu & Gupta
  2017 and most LLM pruning baselines do);
* ``"magnitude-global"``: one threshold on ``|W_ij|`` over all targeted layers together, so layers
  end with different sparsities and the total is the one asked;
* ``"wanda"``: Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"
  (Wanda): score ``S_ij = |W_ij| · ‖X_j‖₂``, with ``X_j`` the j-th input feature over every
  calibration token, and the comparison group one output row (each row of W, read as
  ``(d_out, d_in)``, loses the same number of weights), which the paper finds better than per-layer
  comparison for LLMs. Input norms are captured by forward pre-hooks during one pass over the
  calibration batches, on the unpruned model. Choices the paper leaves open: the reference code
  (``lib/prune.py``, ``prune_wanda``) prunes decoder block by block, feeding each block the outputs
  of the already pruned blocks before it; here every layer's norms come from one pass through the
  dense model (cheaper, and the paper describes Wanda as needing a single forward pass). Every
  position of every calibration batch counts, padding included: give unpadded batches (the paper
  uses 128 sequences of 2,048 tokens from C4). Squared norms are summed in float64.

Counts. A layer of ``n`` weights loses ``floor(sparsity · n)`` (per layer), all targeted layers
together ``floor(sparsity · N)`` (global), and each row ``floor(sparsity · d_in)`` (Wanda, as the
reference code's ``int(W.shape[1] * sparsity_ratio)``). Ties at the threshold are broken by
position (lowest index pruned first), so the counts are exact.

Masks. Each pruned module holds its mask as a boolean buffer ``prune_mask`` (the weight's own
shape; True = kept; non-persistent, so a ``state_dict`` and ``save_pretrained`` are unchanged) and
a forward pre-hook that multiplies the weight by it again whenever the weight was written since the
last time (tracked by the tensor's version counter), so an optimizer step or a merge can never make
a pruned weight count in a forward pass. :func:`apply_masks` does the same at once (call it after
:func:`paretune.merge`, or as the trainer's ``on_step``); :func:`remove_masks` drops masks and
hooks (the zeros stay). Pruning a layer that already has a mask keeps the old zeros pruned: they
are ranked lowest, and the new mask is the old one AND the new one.

Retraining (PERP: Zimmer et al. 2023/2024, "PERP: Rethinking the Prune-Retrain Paradigm in the Era
of LLMs"): :func:`perp` retrains only biases and normalisation parameters (``"norms-biases"``), or
a LoRA whose low-rank product is masked (``"lora"``, the paper's MaskLoRA: ``W + M ⊙ (s·B·A)``), so
that merging it leaves every pruned weight at zero and the merged model computes exactly what the
adapter computed while training.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.geometry import geometry_for
from ..core.host import Host
from ..core.inject import Targets, hosts, iter_modules, kind_of, match_targets
from ..errors import ConfigError, ParetuneError

MASK = "prune_mask"
METHODS = ("magnitude", "magnitude-global", "wanda")
KINDS = ("linear", "conv1d")
_HOOK = "_prune_hook"
_VERSION = "_prune_version"

__all__ = ["prune", "apply_masks", "remove_masks", "masks", "sparsity_report", "wanda_scores",
           "lowest_k", "perp", "METHODS"]


# -- selection ---------------------------------------------------------------------------------
def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean tensor shaped like ``scores`` that is True at exactly ``k`` of its lowest entries
    (ties at the threshold: lowest flat index first)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    out = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return out.view(scores.shape)
    if k >= n:
        return out.fill_(True).view(scores.shape)
    t = torch.kthvalue(flat.float().cpu() if flat.dtype in (torch.float16, torch.bfloat16) else flat, k).values
    t = t.to(flat.device)
    out = flat < t
    need = k - int(out.sum())
    if need > 0:
        ties = (flat == t).nonzero().squeeze(1)[:need]
        out[ties] = True
    return out.view(scores.shape)


def _lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` lowest entries of each row (stable sort: ties by column)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        out.scatter_(1, idx, True)
    return out


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij| · ‖X_j‖₂`` for a ``(d_out, d_in)`` weight and the per-input-feature
    sums of squares ``Σ_tokens x_j²`` (length ``d_in``); float32 or wider."""
    if weight.dim() != 2 or input_sq_norms.shape != (weight.shape[1],):
        raise ParetuneError(f"wanda_scores: weight must be (d_out, d_in) and the norms (d_in,); got "
                            f"{tuple(weight.shape)} and {tuple(input_sq_norms.shape)}.")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype).abs() * input_sq_norms.to(weight.device, torch.float64).sqrt().to(dtype)[None, :]


# -- masks on modules --------------------------------------------------------------------------
def _mask_pre_hook(module: nn.Module, args: Any) -> None:
    """Multiply the weight by its mask again if it was written since the last time."""
    w = module.weight
    if w._version != getattr(module, _VERSION, None):
        with torch.no_grad():
            w.mul_(module._buffers[MASK].to(w.dtype))
        setattr(module, _VERSION, w._version)


def _install(module: nn.Module, mask: torch.Tensor) -> None:
    """Give ``module`` its mask (AND-ed with an existing one), zero the pruned weights, hook it."""
    old = module._buffers.get(MASK)
    if old is not None:
        mask = mask & old
    module.register_buffer(MASK, mask.to(module.weight.device), persistent=False)
    with torch.no_grad():
        module.weight.mul_(mask.to(module.weight.dtype))
    setattr(module, _VERSION, module.weight._version)
    if getattr(module, _HOOK, None) is None:
        setattr(module, _HOOK, module.register_forward_pre_hook(_mask_pre_hook))


def _masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module holding a prune mask (a hosted module under its host's name)."""
    out = []
    for name, m in iter_modules(model):
        base = m.base if isinstance(m, Host) else m
        if MASK in base._buffers:
            out.append((name, base))
    return out


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> its boolean mask (True = kept; the weight's own layout)."""
    return {name: m._buffers[MASK] for name, m in _masked_modules(model)}


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Zero every pruned weight now (after :func:`paretune.merge`, an optimizer step, or anything
    else that wrote the weights); returns how many modules hold a mask. As the trainer's hook:
    ``on_step=lambda step, model, optimizer: apply_masks(model)``."""
    found = _masked_modules(model)
    for _, m in found:
        if "weight" not in m._parameters:  # a QuantizedLinear applies its mask when it dequantises
            continue
        m.weight.mul_(m._buffers[MASK].to(m.weight.dtype))
        setattr(m, _VERSION, m.weight._version)
    return len(found)


def remove_masks(model: nn.Module) -> int:
    """Drop every prune mask and its hook; the weights keep their zeros. Returns the count. A
    quantised layer's pruned positions get their round-to-nearest values back (its codes were
    never zero there)."""
    found = _masked_modules(model)
    for _, m in found:
        handle = getattr(m, _HOOK, None)
        if handle is not None:
            handle.remove()
        for attr in (_HOOK, _VERSION):
            if attr in m.__dict__:
                delattr(m, attr)
        del m._buffers[MASK]
    return len(found)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Per masked layer and in total: weights, pruned (masked) weights, sparsity; and the model's
    parameters remaining (all parameters, shared ones once, minus the pruned weights)."""
    layers = {}
    for name, m in _masked_modules(model):
        mask = m._buffers[MASK]
        n, z = mask.numel(), int((~mask).sum())
        layers[name] = {"shape": list(mask.shape), "weights": n, "pruned": z, "sparsity": z / n}
    total = sum(v["weights"] for v in layers.values())
    pruned = sum(v["pruned"] for v in layers.values())
    params = _n_params(model)
    return {"layers": layers, "targeted_weights": total, "pruned_weights": pruned,
            "sparsity": pruned / total if total else 0.0, "model_params": params,
            "params_remaining": params - pruned, "fraction_remaining": (params - pruned) / params if params else 1.0}


# -- pruning -----------------------------------------------------------------------------------
def _check(sparsity: Any, method: Any) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity={sparsity!r}: give the fraction of weights to remove, a number in [0, 1) "
                          "(0.5 removes half).")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}.")


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _input_sq_norms(model: nn.Module, names: Sequence[str], calibration: Iterable, progress: bool) -> dict:
    """Σ over calibration tokens of x_j² for every input feature j of each named module."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str, d_in: int):
        def hook(module, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("input")
            x = x.detach().reshape(-1, d_in).to(torch.float64)
            s = x.pow(2).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
        return hook

    for name in names:
        module = model.get_submodule(name)
        g = geometry_for(module.base if isinstance(module, Host) else module)
        handles.append(module.register_forward_pre_hook(hook_for(name, g.d_in)))
    was_training = model.training
    batches = 0
    try:
        model.eval()
        total = len(calibration) if hasattr(calibration, "__len__") else None
        it = calibration
        if progress:
            from ..progress import bar as progress_bar

            it = progress_bar(calibration, total=total, desc="wanda calibration", unit="batch", leave=False)
        with torch.no_grad():
            for batch in it:
                _call(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ConfigError("wanda: the calibration data held no batch; pass an iterable of model inputs "
                          "(tensors of input ids, or dicts of model keyword arguments).")
    missing = [n for n in names if n not in sums]
    if missing:
        raise ParetuneError(f"wanda: the calibration batches never reached {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}; leave those out of targets.")
    return sums


def prune(
    model: nn.Module,
    sparsity: float,
    method: str = "magnitude",
    *,
    targets: Targets = None,
    calibration: Iterable | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune ``model``'s Linear / GPT-2 Conv1D weights in place and return a report.

    ``sparsity``: the fraction of each layer's (``"magnitude"``, ``"wanda"``) or of all targeted
    layers' (``"magnitude-global"``) weights set to zero, in [0, 1). ``targets``: as in
    :func:`paretune.adapt` (default: every Linear / Conv1D but the output head). ``calibration``:
    an iterable of model inputs (tensors of token ids, tuples, or dicts of keyword arguments),
    required by ``"wanda"``. Masks stay on the modules (see the module docstring), so training and
    merging keep the zeros.

    The report: ``method``, ``requested_sparsity``, ``layers`` (per layer: shape, weights, pruned,
    sparsity), ``targeted_weights``, ``pruned_weights``, ``sparsity`` (over the targeted layers),
    ``model_params``, ``params_remaining``, ``fraction_remaining``, ``seconds``.

    Every check and every score is computed before the first weight changes, so an error leaves
    the model as it was. A model with quantised layers is pruned by
    :func:`paretune.compress.storage.prune_quantized` (scores on the dequantised weights; each
    mask kept on its QuantizedLinear).
    """
    _check(sparsity, method)
    from .quantize import is_quantized

    if is_quantized(model):
        from .storage import prune_quantized

        return prune_quantized(model, sparsity, method, targets=targets, calibration=calibration, progress=progress)
    if method == "wanda" and calibration is None:
        raise ConfigError("wanda needs calibration data: pass calibration=[batch, ...] (a few hundred "
                          "sequences of model inputs; the paper uses 128 x 2,048 tokens).")
    t0 = time.perf_counter()
    names = match_targets(model, targets, KINDS, "prune")
    bases = {}
    for n in names:
        m = model.get_submodule(n)
        bases[n] = m.base if isinstance(m, Host) else m
    geos = {n: geometry_for(b) for n, b in bases.items()}
    norms = _input_sq_norms(model, names, calibration, progress) if method == "wanda" else None

    def scores_of(n: str) -> torch.Tensor:
        w = geos[n].matrix().detach()
        s = wanda_scores(w, norms[n]) if norms is not None else w.abs().to(torch.promote_types(w.dtype, torch.float32))
        old = bases[n]._buffers.get(MASK)
        if old is not None:  # already pruned weights rank lowest and stay pruned
            s = s.masked_fill(~_matrix_view(geos[n], old), -1.0)
        return s

    new_masks: dict[str, torch.Tensor] = {}  # True = pruned, in the (d_out, d_in) view
    if method == "magnitude-global":
        all_scores = [scores_of(n).reshape(-1) for n in names]
        flat = torch.cat([s.to(all_scores[0].device) for s in all_scores])
        pruned = lowest_k(flat, int(sparsity * flat.numel()))
        del flat
        for n, part in zip(names, pruned.split([s.numel() for s in all_scores])):
            new_masks[n] = part.view(geos[n].d_out, geos[n].d_in)
    else:
        it = names
        if progress:
            from ..progress import bar as progress_bar

            it = progress_bar(names, desc=f"prune {method}", unit="layer", leave=False)
        for n in it:
            s = scores_of(n)
            if method == "wanda":
                new_masks[n] = _lowest_per_row(s, int(sparsity * s.shape[1]))
            else:
                new_masks[n] = lowest_k(s, int(sparsity * s.numel()))
    for n in names:  # nothing changed up to here
        keep = geos[n].to_native(~new_masks[n])
        _install(bases[n], keep.contiguous())
    full = sparsity_report(model)  # every masked layer (earlier prunes of other layers too)
    layers = {n: full["layers"][n] for n in names}
    total = sum(v["weights"] for v in layers.values())
    pruned_here = sum(v["pruned"] for v in layers.values())
    return {"method": method, "requested_sparsity": float(sparsity), "layers": layers,
            "targeted_weights": total, "pruned_weights": pruned_here, "sparsity": pruned_here / total,
            "model_params": full["model_params"], "params_remaining": full["params_remaining"],
            "fraction_remaining": full["fraction_remaining"],
            "seconds": time.perf_counter() - t0}


def _matrix_view(geometry, native: torch.Tensor) -> torch.Tensor:
    """A tensor in the base weight's layout read in the (d_out, d_in) view."""
    kind = geometry.kind
    if kind == "conv1d":
        return native.T
    return native.reshape(geometry.d_out, geometry.d_in)


# -- retraining (PERP) -------------------------------------------------------------------------
PERP_MODES = ("norms-biases", "lora")


def _masklora_hook(name: str, mask_view: torch.Tensor):
    """Forward hook on a host turning adapter ``name``'s LoRA output into MaskLoRA's: subtract the
    pruned part of the low-rank product, ``((1 - M) ⊙ ΔW) x``, so the layer computes
    ``(W + M ⊙ ΔW) x``. It does nothing while the adapter is not run (merged, switched off, or
    inside ``per_sample``, which it does not support), so it may stay on the host for good."""
    off = ~mask_view

    def hook(host: Host, args, out):
        delta = host.deltas[name] if name in host.deltas else None
        if delta is None or host.plan is not None or not any(d is delta for d in host.route()[1]):
            return out
        x = args[0]
        corr = delta.delta_weight().to(x.dtype) * off.to(x.device, x.dtype)
        return out - F.linear(x, corr)
    return hook


def perp(
    model: nn.Module,
    data: Any,
    tokenizer: Any,
    *,
    mode: str = "norms-biases",
    steps: int = 100,
    lr: float = 1e-3,
    r: int = 8,
    name: str = "perp",
    merge: bool = True,
    **train_options: Any,
):
    """Retrain a pruned model the PERP way (Zimmer et al.) and keep its masks; returns the
    trainer's :class:`~paretune.training.trainer.TrainResult`.

    ``mode="norms-biases"``: only every bias and every normalisation layer's parameters train
    (the paper's "Biases + LN" subset; on a Llama-style model without biases, the RMSNorm scales).
    ``mode="lora"``: a LoRA of rank ``r`` on the pruned layers whose product is masked, MaskLoRA
    ``W + M ⊙ (s·B·A)`` (a forward hook on each host subtracts ``((1 - M) ⊙ s·B·A) x``, one dense
    d_out x d_in product per layer and step; the hook stays on the host and does nothing once the
    adapter is merged or off); with ``merge=True`` it is merged afterwards and the masks reapplied,
    which gives exactly the function that was trained: ``M ⊙ (W + ΔW) = W + M ⊙ ΔW`` because the
    pruned W is zero off the mask.

    ``lr`` defaults to 1e-3 (the paper tunes its learning rate per setting; this default is not
    taken from it). Other keyword arguments go to :func:`paretune.training.train` (batch_size,
    warmup, seed, ...). After every optimizer step the masks are applied again.
    """
    from .. import api
    from ..training import train

    if mode not in PERP_MODES:
        raise ConfigError(f"perp: mode={mode!r} is unknown; choose one of {', '.join(PERP_MODES)}.")
    found = _masked_modules(model)
    if not found:
        raise ParetuneError("perp: the model holds no prune mask; run paretune.compress.prune(model, ...) first.")
    if "on_step" in train_options or "method" in train_options:
        raise ConfigError("perp sets method and on_step itself; call paretune.training.train directly for others.")
    if mode == "norms-biases":
        for p in model.parameters():
            p.requires_grad_(False)
        for n, m in iter_modules(model):
            base = m.base if isinstance(m, Host) else m
            if kind_of(base) == "norm":
                for p in base.parameters(recurse=False):
                    p.requires_grad_(True)
            b = getattr(base, "bias", None)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)
    else:
        api.adapt(model, "lora", name=name, targets=[n for n, _ in found], r=r)
        for n, host in hosts(model):
            base = host.base
            if name in host.deltas and MASK in base._buffers:
                host.register_forward_hook(_masklora_hook(name, _matrix_view(host.geometry, base._buffers[MASK])))
    result = train(model, data, tokenizer=tokenizer, method=None, steps=steps, lr=lr,
                   on_step=lambda step, raw, optimizer: apply_masks(raw), **train_options)
    if mode == "lora" and merge:
        api.merge(model, name)
        apply_masks(model)
    return result
