"""Seeded random projections R^k -> R^D for subspace training (Li et al. 2018, "Measuring the
Intrinsic Dimension of Objective Landscapes"; Aghajanyan et al. 2020, "Intrinsic Dimensionality
Explains the Effectiveness of Language Model Fine-Tuning").

Two projections of one layer's D parameters, both with (about) unit-norm columns:

* :class:`DenseProjection`: P ∈ R^{D×k}, entries N(0, 1), each column divided by its norm (Li et
  al.'s dense P). Drawn in fixed chunks of ``CHUNK_ROWS`` rows from a seeded CPU generator, so it
  is either cached whole or regenerated chunk by chunk in the forward and the backward pass (then
  memory holds one chunk, never P); both give the same numbers.
* :class:`FastfoodProjection`: the Fastfood transform (Le, Sarlós & Smola 2013) as Li et al. and
  SAID use it: ``P x = (H G Π H B pad(x))[:D] / (σ · √(D / L))``, L the power of two at or above
  max(D, k), H the L×L Walsh-Hadamard matrix (entries ±1), B random signs, Π a random permutation,
  G N(0, 1), σ = √(L · Σ G²) (each column of H G Π H B then has norm σ, so P's columns have norm
  about one). Memory O(L) (the permutation and G), time O(L log L) per product; P is never formed.
  As the reference code (``fastfood_vars`` / ``fastfood_torched`` in the public PyTorch ports of
  Li et al.'s code used by SAID), but L is taken at or above max(D, k) instead of D, so that k > D
  (a layer smaller than the subspace) projects every coordinate instead of dropping the ones past L.

The Walsh-Hadamard transform is computed with small Hadamard matrices (``scipy.linalg.hadamard``)
applied along groups of the index bits: H_L = H_{2^a} ⊗ H_{2^b} ⊗ ..., each factor one batched
matmul, so about log2(L)/RADIX_BITS passes over the vector.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

CHUNK_ROWS = 4096  # rows of a dense P drawn per generator call; part of P's definition (do not change)
RADIX_BITS = 5  # Hadamard factors of size 2^5 = 32 per pass of the transform


def projection_seed(seed: int, layer: int, what: str) -> int:
    """A 63-bit seed for one layer's projection, stable across runs, platforms and versions."""
    digest = hashlib.sha256(f"subspace:{seed}:{layer}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_HADAMARD: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    if key not in _HADAMARD:
        from scipy.linalg import hadamard

        _HADAMARD[key] = torch.from_numpy(hadamard(n)).to(device, dtype)
    return _HADAMARD[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dimension (a power of two): x @ H, H the
    Sylvester Hadamard matrix (symmetric, H @ H = n·I)."""
    n = x.shape[-1]
    bits = n.bit_length() - 1
    if n < 1 or 1 << bits != n:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    inner = 1  # size of the index block below the bits being transformed
    while bits > 0:
        b = min(RADIX_BITS, bits)
        m = 1 << b
        h = _hadamard(m, y.dtype, y.device)
        if inner == 1:
            y = (y.reshape(-1, m) @ h).reshape(-1, n)
        else:
            y = torch.matmul(h, y.reshape(-1, m, inner)).reshape(-1, n)
        inner *= m
        bits -= b
    return y.reshape(*lead, n)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class DenseProjection(nn.Module):
    """P ∈ R^{D×k}, N(0, 1) entries, unit-norm columns, from ``seed`` (see the module docstring).
    ``cache``: hold P in memory (a non-persistent buffer) or regenerate it in every product."""

    def __init__(self, size: int, dim: int, seed: int, *, cache: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.size, self.dim, self.seed = size, dim, seed
        self.cached = cache
        sq = torch.zeros(dim, dtype=torch.float64)
        chunks = []
        for start in range(0, size, CHUNK_ROWS):
            block = self.chunk(start)
            sq += block.double().pow(2).sum(0)
            if cache:
                chunks.append(block)
        inv_norm = sq.rsqrt()
        self.register_buffer("inv_norm", inv_norm.to(device, dtype), persistent=False)
        if cache:
            p = torch.cat(chunks).to(device, dtype) * self.inv_norm
            self.register_buffer("matrix", p, persistent=False)
        else:
            self.matrix = None

    def chunk(self, start: int) -> torch.Tensor:
        """Rows start .. start+CHUNK_ROWS-1 of the unnormalised P (float32, CPU)."""
        rows = min(CHUNK_ROWS, self.size - start)
        gen = torch.Generator().manual_seed(self.seed + start // CHUNK_ROWS)
        return torch.randn(rows, self.dim, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """P x, (D,), differentiable in x."""
        if self.matrix is not None:
            return self.matrix @ x
        return _DenseProduct.apply(x, self)


class _DenseProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, proj: DenseProjection) -> torch.Tensor:
        ctx.proj = proj
        xs = x * proj.inv_norm
        out = torch.empty(proj.size, dtype=x.dtype, device=x.device)
        for start in range(0, proj.size, CHUNK_ROWS):
            block = proj.chunk(start).to(x.device, x.dtype)
            out[start:start + block.shape[0]] = block @ xs
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        proj = ctx.proj
        g = torch.zeros(proj.dim, dtype=grad.dtype, device=grad.device)
        for start in range(0, proj.size, CHUNK_ROWS):
            block = proj.chunk(start).to(grad.device, grad.dtype)
            g += grad[start:start + block.shape[0]] @ block
        return g * proj.inv_norm, None


class FastfoodProjection(nn.Module):
    """The Fastfood map R^k -> R^D (see the module docstring), from ``seed``."""

    def __init__(self, size: int, dim: int, seed: int, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.size, self.dim, self.seed = size, dim, seed
        self.length = _power_of_two_at_least(max(size, dim))
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.length,), generator=gen) * 2 - 1
        perm = torch.randperm(self.length, generator=gen)
        gauss = torch.randn(self.length, generator=gen, dtype=torch.float64)
        sigma = math.sqrt(self.length * float(gauss.pow(2).sum()))
        self.scale = 1.0 / (sigma * math.sqrt(size / self.length))
        # B only meets the k entries of the zero-padded input, so only those signs are kept
        self.register_buffer("signs", signs[:dim].to(device, dtype), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """P x, (D,), differentiable in x."""
        return _FastfoodProduct.apply(x, self)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """P x through plain autograd with the L×L Hadamard matrix formed (tests, small L only)."""
        from scipy.linalg import hadamard

        h = torch.from_numpy(hadamard(self.length)).to(x.device, x.dtype)
        padded = torch.cat([x * self.signs, x.new_zeros(self.length - self.dim)])
        return (h @ ((h @ padded)[self.perm] * self.gauss))[: self.size] * self.scale


class _FastfoodProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, proj: FastfoodProjection) -> torch.Tensor:
        ctx.proj = proj
        h = x.new_zeros(proj.length)
        h[: proj.dim] = x * proj.signs
        h = fwht(fwht(h).index_select(0, proj.perm) * proj.gauss)
        return h[: proj.size] * proj.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Pᵀ g = B H Πᵀ G H Sᵀ g (H, G, B symmetric; Πᵀ scatters back through the permutation)
        proj = ctx.proj
        t = grad.new_zeros(proj.length)
        t[: proj.size] = grad * proj.scale
        t = fwht(t) * proj.gauss
        u = torch.empty_like(t)
        u[proj.perm] = t
        u = fwht(u)
        return u[: proj.dim] * proj.signs, None
