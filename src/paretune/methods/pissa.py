"""PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models").

W = U S Vᵀ. The adapter starts at the principal part, the base keeps the residual:
A = diag(sqrt(S_r / s)) V_rᵀ (r×d_in), B = U_r diag(sqrt(S_r / s)) (d_out×r), W_res = W − s·B·A,
so W_res + s·B·A == W at init and training then moves the principal directions. (The paper
writes A for the d_out×r factor; paretune keeps LoRA's names, A down, B up.) Dividing S by the
LoRA scaling s (as the reference code and PEFT do) keeps the identity for any alpha.

How the top-r triplets are found (option ``svd``):

* ``"exact"``: a full ``torch.linalg.svd`` of W. Cost grows as d_out·d_in·min(d_out, d_in); on a
  135M-parameter model's 210 layers this took minutes on a CPU.
* ``"randomized"``: the fast randomized SVD the PiSSA authors use for their fast initialisation
  (Halko, Martinsson and Tropp 2011: randomized subspace iteration with ``niter`` iterations,
  the algorithm of ``torch.svd_lowrank``; the paper's "PiSSA with fast SVD"), default
  ``niter=4`` as in their ``pissa_niter_4`` setting. Its random start comes from a private
  generator seeded by ``svd_seed``, so that loading recomputes the same residual and no global
  random state (CPU or CUDA) is touched. It only approximates the principal subspace; the
  identity W_res + s·B·A == W holds exactly either way (W_res is computed from the factors
  found).
* ``"auto"`` (the default): randomized for a layer whose smaller side exceeds
  ``exact_max_dim`` (default 256), exact for smaller layers (where an exact SVD is cheap and
  tests can compare with it). Giving an integer ``niter`` with ``svd="auto"`` asks for the
  randomized SVD on every layer (as ``niter`` did before ``svd`` existed); ``niter=None`` with
  ``svd="auto"`` means the size rule with 4 iterations.

Adapters saved before ``svd`` existed carry ``niter=None`` (exact) or an integer (randomized);
:meth:`PissaConfig.upgrade` maps them to ``svd="exact"`` / ``"randomized"`` so they load with the
residual they were trained on. Saved files hold A and B only: ``paretune.load`` recomputes W_res
from the original base; ``paretune.export_peft`` writes the equivalent rank-2r LoRA on the
original weights (ΔW = s·(B·A − B₀·A₀)), as PEFT's PiSSA conversion does.
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
    svd: str = "auto"
    niter: int | None = None
    svd_seed: int = 0
    exact_max_dim: int = 256

    #: subspace iterations of the randomized SVD when ``niter`` is not given (the authors' default)
    DEFAULT_NITER = 4

    def validate(self) -> None:
        super().validate()
        self._require(self.alpha > 0, "alpha", self.alpha, "PiSSA divides S by alpha/r, so alpha must be > 0")
        if self.niter is not None:
            self._require(isinstance(self.niter, int) and not isinstance(self.niter, bool) and self.niter >= 0,
                          "niter", self.niter,
                          "it must be None (the default: 4 iterations where randomized) or an integer >= 0 "
                          "(randomized SVD iterations)")
        self._one_of("svd", ("auto", "exact", "randomized"))
        self._require(not (self.svd == "exact" and self.niter is not None), "niter", self.niter,
                      "niter is for the randomized SVD; drop it or use svd='randomized' (or 'auto')")
        self._positive_int("exact_max_dim")

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        """Files saved before ``svd`` existed: ``niter=None`` meant an exact SVD, an integer the
        randomized one on every layer."""
        if "svd" not in saved:
            saved = {**saved, "svd": "exact" if saved.get("niter") is None else "randomized"}
        return saved

    def svd_plan(self, d_out: int, d_in: int) -> int | None:
        """``None`` for an exact SVD of a d_out×d_in layer, else the randomized SVD's iterations."""
        niter = self.DEFAULT_NITER if self.niter is None else self.niter
        if self.svd == "exact":
            return None
        if self.svd == "randomized" or self.niter is not None:
            return niter
        return niter if min(d_out, d_in) > self.exact_max_dim else None


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
        g = self.geometry
        u, s, vh = principal_factors(g.matrix(), c.r, c.svd_plan(g.d_out, g.d_in), c.svd_seed)
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
