"""k-bit adapters: quantisation-aware training of an adapter's weight tensors and their packed
storage (Jie, Wang & Deng, ICCV 2023, "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy"; reference code JieShibo/PETL-ViT, ``binary_adapter/utils.py``,
class ``QLinear``).

Each quantised tensor w is standardised, z = (w − μ) / (σ + 1e-5) (μ, σ: its mean and standard
deviation), z is rounded to the nearest of 2^k code values, and the result is scaled back:
w_q = q(z)·σ + μ. The forward pass uses w_q; the backward pass is straight-through (the gradient of
w_q with respect to z is taken as one), as the reference's ``q(w).data + w - w.data``.

The code values are the reference's quantiser for a standard normal: starting from all-zero
boundaries, 500 rounds of "each code value is the median of its cell under N(0, 1), each boundary
the midpoint of its two code values" (``QLinear.quantize``), a fixed point that minimises the
expected absolute quantisation error of a Gaussian weight. For k = 1 the codes are ±0.6745 (the
medians of the half normals).

Stored: the codes packed k bits each into bytes (code i of a byte at bits (i mod 8/k)·k, as the
reference's ``dump``), plus μ and σ as two float32 numbers per tensor; a 1-bit tensor takes 1/32 of
its float32 bytes plus those 8. Loading puts the dequantised weights back (q·σ + μ, computed in the
adapter's dtype as the quantised forward pass computes it) and serves them as they are, as the reference's
``load`` (``fake_quan = False``): re-quantising them would not give the same codes, because their
mean and spread are not μ and σ.

Which tensors: every trainable tensor of the adapter with two or more dimensions (weight matrices
and factor stacks; biases, scaling vectors and the adapter's shared tensors stay in full
precision), the reference quantising the adapter's Linear weights.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

BITS = (1, 2, 4, 8)
EPS = 1e-5  # the reference's std guard
ROUNDS = 500  # fixed-point rounds of the code values (the reference's)


@functools.lru_cache(maxsize=None)
def codebook(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(code values, boundaries) of the k-bit quantiser for a standard normal (module docstring)."""
    from scipy.stats import norm

    n = 2**bits
    values = [0.0] * n
    bounds = [0.0] * (n - 1)
    for _ in range(ROUNDS):
        bounds = [(values[i] + values[i + 1]) / 2 for i in range(n - 1)]
        edges = [0.0, *norm.cdf(bounds), 1.0]
        values = [float(norm.ppf((edges[i] + edges[i + 1]) / 2)) for i in range(n)]
    return tuple(values), tuple(bounds)


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not offered; choose one of {', '.join(map(str, BITS))}.")


def _stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w.mean(), w.std() if w.numel() > 1 else torch.zeros((), dtype=w.dtype, device=w.device)


def codes_of(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
    """(code indices (int64, w's shape), μ, σ) of a tensor."""
    values, bounds = codebook(bits)
    mean, std = _stats(w.detach())
    z = (w.detach() - mean) / (std + EPS)
    idx = torch.bucketize(z, torch.tensor(bounds, dtype=z.dtype, device=z.device))
    return idx, float(mean), float(std)


def dequantize(idx: torch.Tensor, mean: float, std: float, bits: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q·σ + μ, computed in ``dtype`` as the quantised forward pass computes it."""
    values = torch.tensor(codebook(bits)[0], dtype=dtype, device=idx.device)
    return values[idx] * torch.tensor(std, dtype=dtype) + torch.tensor(mean, dtype=dtype)


class KBit(nn.Module):
    """The parametrisation of one quantised tensor: w -> q((w − μ)/(σ + ε))·σ + μ with a
    straight-through backward; ``exact`` (after loading stored codes) passes the tensor through."""

    def __init__(self, bits: int):
        super().__init__()
        check_bits(bits)
        self.bits = bits
        self.exact = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return w
        values, bounds = codebook(self.bits)
        mean, std = _stats(w)
        z = (w - mean) / (std + EPS)
        zd = z.detach()
        idx = torch.bucketize(zd, torch.tensor(bounds, dtype=z.dtype, device=z.device))
        q = torch.tensor(values, dtype=z.dtype, device=z.device)[idx]
        return (q + (z - zd)) * std + mean  # z - zd is exactly 0: the value is q·σ + μ to the bit

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (", exact" if self.exact else "")


def pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Code indices (any shape, values < 2^k) -> uint8 bytes, 8/k codes per byte, code i at bits
    (i mod 8/k)·k."""
    per = 8 // bits
    flat = idx.reshape(-1).to(torch.int64).cpu()
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (flat << shifts).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack`: the first ``numel`` code indices (int64)."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64).view(-1, 1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel]


def packed_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def quantizable(delta: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owning module, parameter name) of every trainable tensor of ``delta`` with two or more
    dimensions, outside its bank (shared tensors stay in full precision)."""
    out = []
    for mod_name, module in delta.named_modules():
        if mod_name == "bank" or mod_name.startswith("bank."):
            continue
        params = module.__dict__.get("_parameters", {})
        if parametrize.is_parametrized(module):
            continue  # already quantised
        for name, p in list(params.items()):
            if p is not None and p.dim() >= 2:
                out.append((module, name))
    return out


def quantize_delta(delta: nn.Module, bits: int) -> list[str]:
    """Quantise ``delta``'s weight tensors (see :func:`quantizable`); returns their names."""
    names = []
    prefix = {m: n for n, m in delta.named_modules()}
    for module, name in quantizable(delta):
        parametrize.register_parametrization(module, name, KBit(bits), unsafe=True)
        names.append(f"{prefix[module]}.{name}" if prefix[module] else name)
    return names


def quantized_tensors(delta: nn.Module) -> dict[str, tuple[nn.Module, str, KBit]]:
    """name -> (module, parameter name, its KBit) of the quantised tensors of ``delta``."""
    out = {}
    for mod_name, module in delta.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, KBit):
                    out[f"{mod_name}.{name}" if mod_name else name] = (module, name, p)
    return out


def stored_quantized(delta: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """What a k-bit adapter's file holds for ``delta``: for each quantised tensor ``n``, ``n.codes``
    (packed uint8) and ``n.stats`` (float32 μ, σ)."""
    out = {}
    for name, (module, pname, _) in quantized_tensors(delta).items():
        w = module.parametrizations[pname].original
        idx, mean, std = codes_of(w, bits)
        out[f"{name}.codes"] = pack(idx, bits)
        out[f"{name}.stats"] = torch.tensor([mean, std], dtype=torch.float32)
    return out


@torch.no_grad()
def load_quantized(delta: nn.Module, state: dict[str, torch.Tensor], bits: int) -> None:
    """Put the stored codes back as dequantised weights, served exactly (see the module docstring)."""
    for name, (module, pname, kbit) in quantized_tensors(delta).items():
        original = module.parametrizations[pname].original
        idx = unpack(state[f"{name}.codes"].cpu(), bits, original.numel()).view(original.shape)
        mean, std = (float(v) for v in state[f"{name}.stats"])
        original.copy_(dequantize(idx.to(original.device), mean, std, bits, original.dtype))
        kbit.exact = True


def _quantized_keys(delta: nn.Module) -> dict[str, str]:
    """stored_state name of each quantised tensor (the parametrised original, as Delta's default
    stored_state names it) -> the name the file uses for its codes (the tensor's own name)."""
    out = {}
    for name in quantized_tensors(delta):
        path, _, pname = name.rpartition(".")
        out[f"{path + '.' if path else ''}parametrizations.{pname}.original"] = name
    return out


def check_quantizable(delta: nn.Module, method: str) -> None:
    """k-bit storage rewrites the file's entries of the quantised tensors: it is offered for
    methods that store their parameters as they are (Delta's default stored_state)."""
    from .delta import Delta

    cls = type(delta)
    if cls.stored_state is not Delta.stored_state or cls.load_stored is not Delta.load_stored:
        raise ConfigError(
            f"bits: {method} stores more (or other) than its parameters as they are (seeds, positions, shared "
            "tensors), so its file cannot hold packed weights; k-bit adapters are offered for methods that store "
            "their parameters (LoRA, Hydra, Block-LoRA, Kronecker, bottleneck adapters, ...)."
        )


def stored(delta: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """The file's tensors of a k-bit ``delta``: its stored_state with each quantised tensor replaced
    by ``<name>.codes`` (packed) and ``<name>.stats`` (μ, σ)."""
    keys = _quantized_keys(delta)
    out = {k: v for k, v in delta.stored_state().items() if k not in keys}
    out.update(stored_quantized(delta, bits))
    return out


def check_state(delta: nn.Module, state: dict[str, torch.Tensor], bits: int, where: str = "") -> None:
    """Raise AdapterFileError unless ``state`` has the names and shapes :func:`stored` writes."""
    from ..errors import AdapterFileError

    expected = {k: tuple(v.shape) for k, v in stored(delta, bits).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise AdapterFileError(
            f"k-bit adapter tensors for {where or 'a module'} do not match: missing {missing or 'none'}, unexpected "
            f"{extra or 'none'}, other shapes {wrong or 'none'}. Was the file written with other bits or options?"
        )


@torch.no_grad()
def load(delta: nn.Module, state: dict[str, torch.Tensor], bits: int, where: str = "") -> None:
    """Load what :func:`stored` wrote (names and shapes checked first; nothing changes on error)."""
    check_state(delta, state, bits, where)
    params = dict(delta.named_parameters())
    params.update(dict(delta.named_buffers()))
    for name, value in state.items():
        if not name.endswith((".codes", ".stats")):
            params[name].copy_(value.to(params[name].dtype))
    load_quantized(delta, state, bits)


def file_tensors(delta: nn.Module, bits: int | None) -> dict[str, torch.Tensor]:
    """What an adapter file holds for one delta: its stored_state, or for a k-bit adapter the same
    with its weight tensors packed (:func:`stored`)."""
    return delta.stored_state() if bits is None else stored(delta, bits)


def load_file_tensors(delta: nn.Module, state: dict[str, torch.Tensor], bits: int | None, where: str) -> None:
    """The inverse of :func:`file_tensors`."""
    if bits is None:
        delta.load_stored(state, where=where)
    else:
        load(delta, state, bits, where)
