"""What AdaLoRA and IncreLoRA share: the SVD form of the update, its orthogonality regulariser, the
sensitivity × uncertainty importance with its two moving averages, and the adapter-wide
coordination of a budget through the bank.

The SVD form (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", eq. 3) writes the update of one weight matrix as r triplets (b_i, e_i, a_i):

    ΔW = s · Σ_i b_i e_i a_iᵀ = s · B · diag(E) · A,   A (r, d_in), E (r, 1), B (d_out, r)

(P = B holds the left singular vectors, Q = A the right ones, Λ = E the singular values). E starts
at zero and A, B at N(0, 0.02²), as ``loralib/adalora.py`` of the authors and PEFT's
``AdaLoraLayer.reset_lora_parameters`` do, so the adapted model starts equal to the base.

Importance (AdaLoRA eq. 8-11): for every trainable entry θ, the sensitivity I = |θ · ∂L/∂θ|, its
moving average Ī ← β1 Ī + (1 − β1) I and the uncertainty Ū ← β2 Ū + (1 − β2) |I − Ī|; the score
is s(θ) = Ī · Ū, and triplet i scores s(e_i) + mean_j s(A_ij) + mean_j s(B_ji). PEFT's
``RankAllocator.update_ipt`` / ``_element_score`` / ``mask_to_budget`` compute the same, in this
order (Ī is updated first, and Ū uses the new Ī).

Budget coordination: one bank per adapter (:func:`coordinator`) lists the adapter's deltas in the
order they were built; the first delta whose ``on_step`` sees a step not yet handled runs the
adapter-wide step for all of them (the trainer calls every delta's ``on_step`` after the optimizer
step, while all gradients are still there), and the others find it done. The bank remembers the
last step handled, so a repeated call (the resume call of the trainer) does nothing.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..core.bank import Bank

INIT_STD = 0.02  # N(0, 0.02²) for A and B, as the authors' loralib and PEFT


def coordinator(**values) -> Bank:
    """A bank for one adapter: ``members`` (its deltas in build order, filled by :func:`join`),
    ``last`` (the last step whose adapter-wide update ran) and any other setting given."""
    return Bank(members=[], last=0, **values)


def join(bank: Bank, delta: nn.Module) -> None:
    """Add ``delta`` to the adapter's list (a plain list: the bank does not register the deltas as
    its submodules, so the module tree has no cycle)."""
    bank.members.append(delta)


def first_call(bank: Bank, step: int) -> bool:
    """True once per step (the first delta to ask runs the adapter-wide update); False for a step
    already handled or an older one."""
    if step <= bank.last:
        return False
    bank.last = step
    return True


def orth_penalty(a: torch.Tensor, b: torch.Tensor, squared: bool) -> torch.Tensor:
    """‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F (``squared=False``, the authors' ``compute_orth_regu`` and
    PEFT's ``AdaLoraModel.forward``) or ‖A Aᵀ − I‖²_F + ‖Bᵀ B − I‖²_F (``squared=True``, the
    paper's eq. 4)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    ca = a @ a.T - eye
    cb = b.T @ b - eye
    if squared:
        return ca.pow(2).sum() + cb.pow(2).sum()
    return torch.linalg.matrix_norm(ca) + torch.linalg.matrix_norm(cb)


@torch.no_grad()
def update_importance(value: torch.Tensor, grad: torch.Tensor | None, avg_ipt: torch.Tensor,
                      avg_unc: torch.Tensor, beta1: float, beta2: float) -> None:
    """One step of AdaLoRA's two moving averages, in place: I = |θ · g|, Ī ← β1 Ī + (1 − β1) I,
    Ū ← β2 Ū + (1 − β2) |I − Ī| (a parameter without a gradient has sensitivity 0)."""
    ipt = torch.zeros_like(avg_ipt) if grad is None else (value * grad).abs().to(avg_ipt.dtype)
    avg_ipt.mul_(beta1).add_(ipt, alpha=1 - beta1)
    avg_unc.mul_(beta2).add_((ipt - avg_ipt).abs(), alpha=1 - beta2)


def triplet_scores(s_e: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """Score of each triplet (r,): s(e_i) + mean over the row of A + mean over the column of B,
    from the element scores s = Ī·Ū of E (r, 1), A (r, d_in) and B (d_out, r)."""
    return s_e.view(-1) + s_a.mean(dim=1) + s_b.mean(dim=0)


def layer_seed(method: str, seed: int, layer: int, which: str) -> int:
    """A 63-bit seed for one layer's tensor, stable across runs and platforms."""
    digest = hashlib.sha256(f"{method}:{seed}:{layer}:{which}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def normal(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """N(0, 0.02²) entries from a private generator (CPU, float32, then cast and moved)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * INIT_STD).to(dtype=dtype, device=device)
