"""PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models").

W = U S Vᵀ. The adapter starts at the principal part, the base keeps the residual:
A = diag(sqrt(S_r / s)) V_rᵀ (r×d_in), B = U_r diag(sqrt(S_r / s)) (d_out×r), W_res = W − s·B·A,
so W_res + s·B·A == W at init and training then moves the principal directions. (The paper
writes A for the d_out×r factor; paretune keeps LoRA's names, A down, B up.) Dividing S by the
LoRA scaling s (as the reference code and PEFT do) keeps the identity for any alpha.

``niter=None`` computes an exact SVD; an integer uses the fast randomized SVD (Halko, Martinsson
and Tropp 2011: randomized subspace iteration with ``niter`` iterations, the algorithm of
``torch.svd_lowrank``) with its random start drawn from a private generator seeded by
``svd_seed``, so that loading recomputes the same residual and no global random state (CPU or
CUDA) is touched. Saved files hold A and B only: ``paretune.load`` recomputes W_res from the
original base; ``paretune.export_peft`` writes the equivalent rank-2r LoRA on the original
weights (ΔW = s·(B·A − B₀·A₀)), as PEFT's PiSSA conversion does.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError
from .lora import LoraDelta, LowRankConfig


@dataclasses.dataclass
class PissaConfig(LowRankConfig):
    niter: int | None = None
    svd_seed: int = 0

    def validate(self) -> None:
        super().validate()
        self._require(self.alpha > 0, "alpha", self.alpha, "PiSSA divides S by alpha/r, so alpha must be > 0")
        if self.niter is not None:
            self._require(isinstance(self.niter, int) and not isinstance(self.niter, bool) and self.niter >= 0,
                          "niter", self.niter,
                          "it must be None (exact SVD) or an integer >= 0 (randomized SVD iterations)")


def principal_factors(w: torch.Tensor, r: int, niter: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    """Top-r singular triplets (U_r, S_r, V_rᵀ) of ``w``, exact or randomized, computed in float32
    (float64 for a float64 ``w``)."""
    w = w.to(adapter_dtype(w))
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    return randomized_svd(w, r, niter, seed)


def randomized_svd(w: torch.Tensor, r: int, niter: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Rank-r randomized SVD of ``w`` (Halko et al. 2011, Alg. 4.4 then 5.1): an orthonormal basis
    Q of the range of ``w @ Ω`` (Ω Gaussian, from a generator seeded by ``seed``), refined by
    ``niter`` subspace iterations, then the exact SVD of the small ``Qᵀ w``."""
    gen = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(w.shape[1], r, generator=gen, device=w.device, dtype=w.dtype)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    u, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vh


@register(
    "pissa",
    config=PissaConfig,
    summary="PiSSA (Meng et al. 2024): LoRA started from W's top-r singular triplets, residual frozen in the base",
    formula="r·(d_in + d_out)",
)
class PissaDelta(LoraDelta):
    shifts_base = True

    def __init__(self, geometry: Geometry, config: PissaConfig, **context):
        if config.r > min(geometry.d_out, geometry.d_in):
            raise ConfigError(
                f"pissa: r={config.r} exceeds min(d_out, d_in)={min(geometry.d_out, geometry.d_in)} of a "
                f"{geometry.kind} layer; lower r or leave that layer out of targets."
            )
        super().__init__(geometry, config, **context)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        u, s, vh = principal_factors(self.geometry.matrix(), c.r, c.niter, c.svd_seed)
        root = torch.sqrt(s / self.scaling)
        self.A.copy_(root[:, None] * vh)
        self.B.copy_(u * root[None, :])
        # the starting factors: kept (not saved) to restore the base and to export to PEFT
        self.register_buffer("A0", self.A.detach().clone(), persistent=False)
        self.register_buffer("B0", self.B.detach().clone(), persistent=False)
        self.geometry.add_to_weight(self._start_delta(), sign=-1.0)

    def _start_delta(self) -> torch.Tensor:
        """s·B₀·A₀, the principal part moved out of the base at init."""
        dtype = adapter_dtype(self.A0)
        return self.scaling * (self.B0.to(dtype) @ self.A0.to(dtype))

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"A": self.A.detach(), "B": self.B.detach()}

    def unshift(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if self.kind != "embedding":
            x = x.to(self.A0.dtype)
        return g.project_out(g.project_in(x, self.A0), self.B0 * self.scaling)

    def restore_base(self) -> None:
        self.geometry.add_to_weight(self._start_delta(), sign=1.0)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = torch.cat([self.A.detach(), self.A0], dim=0)
        b = torch.cat([self.B.detach(), -self.B0], dim=1)
        return a, b, self.scaling
