"""Every fast path of the engine, each beside the plain reference it is tested against
(tests/core/test_fast_paths.py compares each pair).

=============================  ==================================  ==============================
fast path                      what it saves                       reference
=============================  ==================================  ==============================
:func:`add_low_rank`           no activation-sized temporaries:    :func:`add_low_rank_reference`
                               the up projection, the scaling and
                               the add are one ``addmm``
:class:`FusedLoraLinear`       base op + low-rank branch in one    :func:`lora_linear_reference`
                               autograd node, in-place adds in
                               forward and backward (training)
:func:`gathered_low_rank`      each row its own adapter with two   :func:`gathered_low_rank_reference`
                               batched matmuls (BGMV, as Punica /
                               S-LoRA), not a loop over adapters
=============================  ==================================  ==============================

A fast path never writes into a tensor that someone else may hold: :func:`intercepted` tells
when a hook or a replaced ``forward`` stands between a module and its op.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

MATMUL_KINDS = ("linear", "conv1d")  # host kinds whose op is x @ Wᵀ on the last dimension


def intercepted(module: nn.Module) -> bool:
    """Whether something stands between a call of ``module`` and its plain op: forward hooks
    (its own or global) or a replaced ``forward`` (accelerate's offloading hooks do that); then
    its output may be held elsewhere, and fast paths neither bypass the call nor write into it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def autocast_on() -> bool:
    """Whether autocast is active on the CPU or (when there is one) the GPU."""
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available())


# -- the low-rank add ----------------------------------------------------------------------------
def add_low_rank(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 inplace: bool) -> torch.Tensor:
    """out + scaling · (x Aᵀ) Bᵀ on the last dimension, with the up projection, the scaling and the
    add as one ``addmm``. x (..., d_in), out (..., d_out), all of one dtype. ``inplace``: add into
    ``out`` itself (the caller knows nobody else holds it and no gradient flows through it)."""
    h = torch.nn.functional.linear(x, a).reshape(-1, a.shape[0])
    flat = out.reshape(-1, b.shape[0])
    if inplace and flat.is_contiguous():
        return flat.addmm_(h, b.t(), alpha=scaling).view(out.shape)
    return torch.addmm(flat, h, b.t(), alpha=scaling).view(out.shape)


def add_low_rank_reference(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           scaling: float) -> torch.Tensor:
    """The plain form of :func:`add_low_rank`: out + scaling · x Aᵀ Bᵀ."""
    return out + scaling * (x @ a.T @ b.T)


# -- the fused training node ---------------------------------------------------------------------
class FusedLoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with W, b frozen, as one autograd node: the up projection is added
    into the base output in place (addmm_), and in backward the low-rank part of ∂x is added into
    the base part in place, so neither pass makes an activation-sized temporary for the branch.
    Saves x and the small h = x Aᵀ (what separate ops would save too). A and B may be any tensors
    of the graph (a method's factors computed from its parameters), not only leaves."""

    @staticmethod
    def forward(ctx, x, w, b, a, up, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
        h = x2 @ a.t()
        y.addmm_(h, up.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, w, a, up)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, h, w, a, up = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ up).mul_(s)
        gx = ga = gup = None
        if ctx.needs_input_grad[0]:
            gx = (g @ w).addmm_(gh, a).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            ga = gh.t() @ x2
        if ctx.needs_input_grad[4]:
            gup = (g.t() @ h).mul_(s)
        return gx, None, None, ga, gup, None


def lora_linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor,
                          up: torch.Tensor, scaling: float) -> torch.Tensor:
    """The plain form of :class:`FusedLoraLinear`: separate ops, autograd's own backward."""
    y = x @ w.T + (b if b is not None else 0)
    return y + scaling * (x @ a.T) @ up.T


# -- the gathered per-sample path ----------------------------------------------------------------
def gathered_low_rank(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      slot: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """out + B[slot[i]] A[slot[i]] x for every row i at once: the factors of each row's adapter are
    gathered and applied as two batched matmuls (the BGMV idea of Punica / S-LoRA), instead of a
    loop over adapters. x (rows, ..., d_in), out (rows, ..., d_out), A (N, R, d_in), B (N, d_out, R)
    with any scaling folded into B. ``inplace``: add into ``out`` itself (it must be a fresh tensor
    nobody else holds), which saves a copy of it."""
    rows = x.shape[0]
    xs = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)
    h = torch.bmm(xs, a.index_select(0, slot).transpose(1, 2))  # (rows, tokens, R)
    up = b.index_select(0, slot).transpose(1, 2)
    base = out.reshape(rows, -1, out.shape[-1])
    if inplace and base.dtype == a.dtype and base.is_contiguous():
        return base.baddbmm_(h, up).view(out.shape)
    return torch.baddbmm(base.to(a.dtype), h, up).view(out.shape).to(out.dtype)


def gathered_low_rank_reference(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                slot: torch.Tensor) -> torch.Tensor:
    """The plain form of :func:`gathered_low_rank`: one row at a time."""
    rows = [out[i] + (x[i].to(a.dtype) @ a[s].T @ b[s].T).to(out.dtype) for i, s in enumerate(slot.tolist())]
    return torch.stack(rows)
