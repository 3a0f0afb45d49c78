"""Low-rank compression of Linear layers with distillation-based recovery (PELA).

Paper: Guo, Wang and Kankanhalli 2024, "PELA: Learning Parameter-Efficient Models with Low-Rank
Approximation" (CVPR 2024, arXiv:2310.10700).

:func:`factorize` replaces each chosen Linear ``W`` (out, in) by two Linears from its truncated
SVD ``W ≈ U_r Σ_r V_rᵀ``: ``down`` (in → r) with weight ``Σ_r^{1/2} V_rᵀ`` and ``up`` (r → out)
with weight ``U_r Σ_r^{1/2}`` and the original bias. The singular values are split evenly between
the two factors (the paper does not say how they are split; the even split gives both factors the
same scale, which keeps their gradients balanced during recovery). By Eckart–Young the error
``‖W − up·down‖_F² = Σ_{i>r} σ_i²`` is the least any rank-r matrix achieves.

The rank is either fixed (``rank=r``) or chosen per layer as the smallest ``r`` whose kept energy
``Σ_{i≤r} σ_i² / Σ_i σ_i²`` reaches ``energy``. A layer whose factorisation would not store fewer
parameters (``r·(in + out) ≥ in·out``) is left as it is (it would only add error); the function
warns and lists such layers.

:func:`distill` is PELA's recovery stage, a short loop: the factorised *student* learns from the
frozen original *teacher* with

``loss = logit_weight · KL(softmax(t/τ) ‖ softmax(s/τ))·τ² + feature_weight · mean_l MSE(h_s^l, h_t^l)``

over the hidden states ``h^l`` of the chosen ``feature_layers`` (PELA's feature distillation aligns
the token features of the two models; the logit term is standard knowledge distillation).
Defaults: ``logit_weight = feature_weight = 1``, ``τ = 1`` (PELA does not publish weights for a
language model; equal weights are our choice). PELA's weight-perturbation regulariser is not
implemented. Only the factor weights train by default (``train="factors"``), so the rest of the
student stays as the teacher's.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .bitnet import Targets, _weight_and_bias, select_linear, set_module


class LowRankLinear(nn.Module):
    """``up(down(x))``: a rank-``rank`` replacement for a Linear (weight ``up.weight @ down.weight``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) matrix the two factors make (computed; for inspection)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def svd_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest ``r ≥ 1`` with ``Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²`` (``s`` sorted descending)."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(min(len(s), int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1))


def factorize_linear(module: nn.Module, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
    """The :class:`LowRankLinear` of a Linear / Conv1D from its truncated SVD (see module docstring);
    the SVD runs in float64 and the factors are cast back to the layer's dtype."""
    w, b = _weight_and_bias(module)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = rank if rank is not None else svd_rank(s, energy)
    r = min(r, len(s))
    root = s[:r].sqrt()
    new = LowRankLinear(w.shape[1], w.shape[0], r, bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.down.weight.copy_((root[:, None] * vh[:r]).to(w.dtype))
        new.up.weight.copy_((u[:, :r] * root[None, :]).to(w.dtype))
        if b is not None:
            new.up.bias.copy_(b)
    return new


def factorize(model: nn.Module, rank: int | None = None, energy: float | None = None, targets: Targets = None) -> nn.Module:
    """Replace the chosen Linear / Conv1D layers of ``model`` (in place) by their truncated-SVD
    :class:`LowRankLinear` (rank ``rank``, or the smallest rank keeping ``energy`` of the squared
    singular values), and return the model. Give exactly one of ``rank`` / ``energy``.
    ``targets`` as in ``paretune.adapt`` (default: every Linear but the output head). Layers the
    factorisation would not make smaller are kept (a warning lists them)."""
    if (rank is None) == (energy is None):
        raise ConfigError("factorize: give exactly one of rank=r (an integer ≥ 1) or energy=f (a fraction in (0, 1]).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"factorize: rank={rank!r} must be an integer ≥ 1.")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"factorize: energy={energy!r} must be a fraction in (0, 1], e.g. 0.9.")
    names = select_linear(model, targets, "factorize")
    kept = []
    from ..progress import bar as progress_bar

    for name in progress_bar(names, desc="factorize", unit="layer", leave=False, enabled=len(names) >= 8):
        module = model.get_submodule(name)
        new = factorize_linear(module, rank, energy)
        if new.rank * (new.in_features + new.out_features) >= new.in_features * new.out_features:
            kept.append(f"{name} (rank {new.rank})")
            continue
        set_module(model, name, new)
    if kept:
        warnings.warn(f"factorize: kept {len(kept)} layer(s) as they are, as a factorisation would not store fewer "
                      f"parameters: {', '.join(kept[:10])}{' ...' if len(kept) > 10 else ''}. Use a smaller rank or "
                      "energy to compress them.")
    return model


def _output(model: nn.Module, batch, want_hidden: bool):
    if isinstance(batch, dict):
        out = model(**batch, output_hidden_states=want_hidden) if want_hidden else model(**batch)
    else:
        out = model(batch, output_hidden_states=want_hidden) if want_hidden else model(batch)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    hidden = getattr(out, "hidden_states", None) if want_hidden else None
    return logits, hidden


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_feats: Sequence[torch.Tensor] = (),
                 teacher_feats: Sequence[torch.Tensor] = (), *, logit_weight: float = 1.0,
                 feature_weight: float = 1.0, temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """PELA's recovery loss (module docstring): ``logit_weight · τ² · KL(teacher ‖ student)`` per
    token plus ``feature_weight`` times the mean over layers of the feature MSE; averaged over the
    tokens where ``mask`` (batch, seq) is 1 (all tokens when None)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t  # per position
    if mask is None:
        mask = torch.ones(kl.shape, dtype=kl.dtype, device=kl.device)
    mask = mask.to(kl.dtype)
    n = mask.sum().clamp(min=1)
    loss = logit_weight * (kl * mask).sum() / n
    if student_feats:
        feat = 0.0
        for hs, ht in zip(student_feats, teacher_feats):
            per_tok = (hs.float() - ht.float()).pow(2).mean(-1)
            feat = feat + (per_tok * mask).sum() / n
        loss = loss + feature_weight * feat / len(student_feats)
    return loss


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, steps: int, lr: float = 1e-4, *,
            feature_layers: Sequence[int] | None = None, logit_weight: float = 1.0, feature_weight: float = 1.0,
            temperature: float = 1.0, train: str = "factors", max_grad_norm: float = 1.0,
            on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> list[float]:
    """Recover a factorised ``student`` by distillation from the frozen ``teacher`` (PELA's
    intermediate stage; loss in the module docstring). ``batches``: an iterable (cycled for
    ``steps`` steps) of token-id tensors (batch, seq) or dicts of model inputs (``input_ids``,
    ``attention_mask``: padded positions are left out of the loss). ``feature_layers``: indices
    into the models' ``hidden_states`` (0 = embeddings, −1 = last), default the last one; ``[]``
    turns the feature term off. ``train="factors"`` trains the LowRankLinear weights only,
    ``"all"`` every student parameter, ``"trainable"`` the parameters that already require a
    gradient (e.g. an adapter added with :func:`paretune.adapt`, which freezes the base). AdamW at constant ``lr``, gradients clipped to
    ``max_grad_norm``. Returns the loss per step; the student is left in eval mode."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"distill: steps={steps!r} must be an integer ≥ 1.")
    if not lr > 0:
        raise ConfigError(f"distill: lr={lr!r} must be positive (e.g. 1e-4).")
    if train not in ("factors", "all", "trainable"):
        raise ConfigError(f"distill: train={train!r}; give 'factors' (the low-rank layers), 'all', or 'trainable' "
                          "(the parameters that require a gradient now).")
    layers = [-1] if feature_layers is None else list(feature_layers)
    if train == "factors":
        params = [p for m in student.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
        if not params:
            raise ConfigError("distill: the student has no LowRankLinear layer; call factorize first, or pass "
                              "train='all'.")
    elif train == "trainable":
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("distill: train='trainable' but no student parameter requires a gradient; add an "
                              "adapter (paretune.adapt) or set requires_grad on the parameters to train.")
    else:
        params = list(student.parameters())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    data = list(batches)
    if not data:
        raise ConfigError("distill: batches is empty; give at least one batch of token ids.")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    student.train()
    history: list[float] = []
    from ..progress import bar as progress_bar

    bar = progress_bar(range(steps), desc="distill", unit="step", leave=False, enabled=progress)
    for step in bar:
        batch = data[step % len(data)]
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        with torch.no_grad():
            t_logits, t_hidden = _output(teacher, batch, bool(layers))
        s_logits, s_hidden = _output(student, batch, bool(layers))
        s_feats = [s_hidden[i] for i in layers] if layers else []
        t_feats = [t_hidden[i] for i in layers] if layers else []
        loss = distill_loss(s_logits, t_logits, s_feats, t_feats, logit_weight=logit_weight,
                            feature_weight=feature_weight, temperature=temperature, mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"distill: the loss became {value} at step {step + 1}; lower lr (now {lr}).")
        history.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        bar.set_postfix(loss=f"{value:.4f}")
    student.eval()
    return history


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once."""
    return sum(p.numel() for p in model.parameters())
