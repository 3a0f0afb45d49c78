"""The merging methods of :mod:`paretune.merging.methods` over a tensor given in row blocks, for
merges that stream big tensors (:func:`paretune.merging.merge_models`).

A block source is a function that, each time it is called, returns a fresh iterable over the
tensor's blocks in order: for each block, one tensor per task (the same rows of every task vector,
of one shape). Concatenating the blocks in order gives the flattened tensor. The functions below
call it several times (one pass per statistic, then the merge pass) and yield the merged task
vector block by block, so memory stays at a few blocks whatever the tensor's size. Whole-tensor
statistics (top-k cut-offs, clip bounds, min / max) are computed exactly: order statistics by a
radix selection over 16-bit digits of the floats' bit patterns, so the results are identical to
the whole-tensor functions (tested).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .methods import (DARE_COMBINE, _check_fraction, _check_majority, _check_pcb_options, _check_tvs,
                      _check_weights, _dare_generator, _elect_and_merge, _work_dtype)

__all__ = ["BLOCK_METHODS", "BlockSource", "dare_blocks", "pcb_blocks", "ties_blocks"]

BlockSource = Callable[[], Iterable[Sequence[Tensor]]]

_RADIX = 16
_BINS = 1 << _RADIX


def _keys(x: Tensor) -> Tensor:
    """int64 keys with the order of the finite floats ``x`` (float32 or float64, contiguous);
    -0.0 and +0.0 get the same key, as they compare equal."""
    if x.dtype == torch.float32:
        bits, flip = x.reshape(-1).view(torch.int32).to(torch.int64), 0x7FFFFFFF
    else:
        bits, flip = x.reshape(-1).view(torch.int64), 0x7FFFFFFFFFFFFFFF
    keys = torch.where(bits < 0, bits ^ flip, bits)
    return keys.masked_fill_(keys == -1, 0)  # -0.0


def _from_key(key: int, dtype: torch.dtype) -> Tensor:
    flip = 0x7FFFFFFF if dtype == torch.float32 else 0x7FFFFFFFFFFFFFFF
    bits = key ^ flip if key < 0 else key
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    return torch.tensor(bits, dtype=itype).view(dtype)


class _OrderStats:
    """Exact order statistics (0-based ranks of the ascending order) of several streams of floats
    seen block by block: ``nbits / 16`` passes, each a 65536-bin histogram of one 16-bit digit of
    the keys that share the digits found so far. Usage: ``want(stream, rank)`` for every rank,
    then, for each pass in ``range(passes)``, ``see(stream, x)`` for every block and ``done()``."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.nbits = 32 if dtype == torch.float32 else 64
        self.passes = self.nbits // _RADIX
        self.queries: list[dict] = []
        self.step = 0

    def want(self, stream: int, rank: int) -> int:
        self.queries.append({"stream": stream, "rank": rank, "prefix": 0, "less": 0, "equal": 0,
                             "hist": torch.zeros(_BINS, dtype=torch.int64)})
        return len(self.queries) - 1

    def see(self, stream: int, x: Tensor) -> None:
        keys = _keys(x)
        shift = self.nbits - _RADIX * (self.step + 1)
        for q in self.queries:
            if q["stream"] != stream:
                continue
            if self.step == 0:
                digits = (keys >> shift) + (_BINS // 2)
            else:
                digits = (keys[(keys >> (shift + _RADIX)) == q["prefix"]] >> shift) & (_BINS - 1)
            q["hist"] += torch.bincount(digits, minlength=_BINS)

    def done(self) -> None:
        for q in self.queries:
            cums = q["hist"].cumsum(0)
            b = int(torch.searchsorted(cums, torch.tensor(q["rank"]), right=True))
            below = int(cums[b - 1]) if b > 0 else 0
            q["rank"] -= below
            q["less"] += below
            q["equal"] = int(q["hist"][b])
            q["prefix"] = (b - _BINS // 2) if self.step == 0 else (q["prefix"] << _RADIX) | b
            q["hist"].zero_()
        self.step += 1

    def value(self, i: int) -> Tensor:
        """The order statistic (a 0-dim tensor of ``dtype``), after the last pass."""
        return _from_key(self.queries[i]["prefix"], self.dtype)

    def counts(self, i: int) -> tuple[int, int]:
        """(entries below it, entries equal to it), after the last pass."""
        return self.queries[i]["less"], self.queries[i]["equal"]


class _Blocks:
    """Checks a block source as it is read: every block a list of n task vectors of one shape and
    dtype, finite (checked in the first pass only), adding up to ``numel`` entries."""

    def __init__(self, source: BlockSource, numel: int, fn: str):
        if not callable(source):
            raise ConfigError(f"{fn}: source must be a function returning the blocks (a list of tensors "
                              f"per block), got {type(source).__name__}.")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ConfigError(f"{fn}: numel must be a non-negative integer, got {numel!r}.")
        self.source, self.numel, self.fn = source, numel, fn
        self.n: int | None = None
        self.dtype: torch.dtype | None = None
        self.device = torch.device("cpu")
        self.checked = False

    def passes(self) -> Iterator[list[Tensor]]:
        seen = 0
        for blocks in self.source():
            if self.checked:
                blocks = list(blocks)
            else:
                blocks = _check_tvs(blocks, self.fn)
                if self.n is None:
                    self.n, self.dtype = len(blocks), blocks[0].dtype
                if len(blocks) != self.n or blocks[0].dtype != self.dtype:
                    raise ConfigError(f"{self.fn}: a block has {len(blocks)} task vectors of {blocks[0].dtype} "
                                      f"but the first has {self.n} of {self.dtype}; every block must hold the "
                                      "same rows of every task vector.")
            seen += blocks[0].numel()
            yield blocks
            del blocks
        if seen != self.numel:
            raise ConfigError(f"{self.fn}: the blocks hold {seen} entries but numel is {self.numel}; the source "
                              "must yield the whole tensor, in order, on every call.")
        if self.n is None:
            raise ConfigError(f"{self.fn}: the source yielded no blocks; give at least one block.")
        self.checked = True

    def first(self) -> tuple[int, torch.dtype]:
        """n and dtype, from the first block (reads only that block)."""
        if self.n is None:
            for blocks in self.source():
                blocks = _check_tvs(blocks, self.fn)
                self.n, self.dtype, self.device = len(blocks), blocks[0].dtype, blocks[0].device
                break
            else:
                raise ConfigError(f"{self.fn}: the source yielded no blocks; give at least one block.")
        return self.n, self.dtype  # type: ignore[return-value]


def ties_blocks(
    source: BlockSource,
    *,
    numel: int,
    density: float = 0.2,
    weights: Sequence[float] | None = None,
    majority_sign: str = "total",
) -> Iterator[Tensor]:
    """:func:`ties` over a tensor given in row blocks; yields the merged task vector block by block.

    ``source()`` returns the blocks in order (one list of task-vector blocks per block, see
    ``BlockSource``); ``numel`` is the whole tensor's number of entries. Three passes: two
    radix passes find every task's trim threshold ``t_i`` (the k-th largest magnitude,
    ``k = max(1, int(density * numel))``) and the number of entries above it; the merge pass keeps
    the entries above ``t_i`` and, among those equal to it, the first ``k - #{|tau_i| > t_i}`` in
    flat index order (counted across blocks), exactly as :func:`ties` does, then elects and
    averages entry by entry. The result, concatenated, equals ``ties`` on the whole tensor.
    """
    src = _Blocks(source, numel, "ties")
    density = _check_fraction(density, "density", "ties")
    _check_majority(majority_sign, "ties")
    n, dtype = src.first()
    w = _check_weights(weights, n, "ties")
    work = _work_dtype(dtype)
    trim = density < 1.0 and numel > 0
    if trim:
        k = max(1, int(density * numel))
        stats = _OrderStats(work)
        ids = [stats.want(i, numel - k) for i in range(n)]
        for _ in range(stats.passes):
            for blocks in src.passes():
                for i, t in enumerate(blocks):
                    stats.see(i, t.to(work).abs())
            stats.done()
        thresholds = [stats.value(q) for q in ids]
        tied_left = []
        for q in ids:
            less, equal = stats.counts(q)
            tied_left.append(k - (numel - less - equal))
    for blocks in src.passes():
        trimmed = []
        for i, t in enumerate(blocks):
            x = t.to(work)
            if trim:
                a = x.abs()
                keep = a > thresholds[i]
                if tied_left[i] > 0:
                    tied = a == thresholds[i]
                    del a
                    first = tied.reshape(-1).cumsum(0).reshape(tied.shape) <= tied_left[i]
                    tied &= first
                    del first
                    tied_left[i] -= int(tied.sum())
                    keep |= tied
                    del tied
                else:
                    del a
                x = x * keep
                del keep
            trimmed.append(x)
        del blocks
        yield _elect_and_merge(trimmed, w, majority_sign).to(dtype)
        del trimmed


def dare_blocks(
    source: BlockSource,
    *,
    numel: int,
    density: float,
    weights: Sequence[float] | None = None,
    combine: str = "linear",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    majority_sign: str = "total",
) -> Iterator[Tensor]:
    """:func:`dare` over a tensor given in row blocks; yields the merged task vector block by block.

    The drop masks are the ones :func:`dare` draws on the whole tensor: task i's mask is the i-th
    run of ``numel`` Bernoulli draws from the generator (task by task, in list order). On a CPU
    generator, drawing a run in consecutive pieces gives the same values as drawing it at once
    (tested), so this first advances the generator through the n runs, remembering its state at
    the start of each, and then draws every task's mask block by block from its own copy of
    that state. The generator ends where :func:`dare` leaves it; the result, concatenated, equals
    ``dare`` on the whole tensor with the same generator or seed. Costs one extra set of draws
    (time, not memory). Generators on other devices may not split runs this way.
    """
    src = _Blocks(source, numel, "dare")
    density = _check_fraction(density, "density", "dare")
    _check_majority(majority_sign, "dare")
    if combine not in DARE_COMBINE:
        raise ConfigError(f"dare: combine must be 'linear' or 'ties', got {combine!r}.")
    n, dtype = src.first()
    w = _check_weights(weights, n, "dare")
    work = _work_dtype(dtype)
    device = src.device
    generator = _dare_generator(generator, seed, device)
    gens: list[torch.Generator | None] = [None] * n
    if density < 1.0:
        piece = 1 << 20
        for i in range(n):
            state = (generator if generator is not None else torch.default_generator).get_state()
            gens[i] = torch.Generator(device=device)
            gens[i].set_state(state)  # type: ignore[union-attr]
            for start in range(0, numel, piece):
                size = min(piece, numel - start)
                torch.bernoulli(torch.full((size,), density, dtype=work, device=device), generator=generator)
    for blocks in src.passes():
        dropped = []
        for i, t in enumerate(blocks):
            x = t.to(work)
            if density < 1.0:
                mask = torch.bernoulli(torch.full_like(x, density), generator=gens[i])
                x = x * mask / density
                del mask
            dropped.append(x)
        del blocks
        if combine == "linear":
            out = torch.zeros_like(dropped[0])
            for wi, x in zip(w, dropped):
                out.add_(x, alpha=wi)
            yield out.to(dtype)
        else:
            yield _elect_and_merge(dropped, w, majority_sign).to(dtype)
        del dropped


def pcb_blocks(
    source: BlockSource,
    *,
    numel: int,
    ratio: float = 0.1,
    weights: Sequence[float] | None = None,
    clip: float = 1e-4,
) -> Iterator[Tensor]:
    """:func:`pcb` over a tensor given in row blocks; yields the merged task vector block by block.

    Five passes: two radix passes find every task's clip bounds ``lo_i``, ``hi_i`` (the order
    statistics of ``|tau_i|`` of step 1) and ``min |tau_i|``, ``max |tau_i|``, from which the
    min / max of the clipped magnitudes follow exactly (clamping is monotone); two more find, per
    task, the cut ``t_i`` of step 4 (an order statistic of ``b_i``, which needs ``sum_j tau_j``
    entry by entry, so every pass reads all tasks) and ``max(b_i)``; the last pass merges. Every
    entry-wise step is computed as :func:`pcb` computes it, so the result, concatenated, equals
    ``pcb`` on the whole tensor (tested bit for bit on CPU).
    """
    src = _Blocks(source, numel, "pcb")
    ratio, clip = _check_pcb_options(ratio, clip)
    n, dtype = src.first()
    w = _check_weights(weights, n, "pcb")
    work = _work_dtype(dtype)
    d = numel
    if d == 0:
        for blocks in src.passes():
            yield torch.zeros_like(blocks[0])
        return
    lo_index, hi_index = int(d * clip), int(d * (1 - clip) - 1)
    cut_index = int(d * (1 - ratio))
    clips = _OrderStats(work)
    bounds = [(clips.want(i, lo_index), clips.want(i, hi_index)) for i in range(n)]
    amin: list[Tensor | None] = [None] * n
    amax: list[Tensor | None] = [None] * n
    for _ in range(clips.passes):
        for blocks in src.passes():
            for i, t in enumerate(blocks):
                a = t.to(work).abs()
                if clips.step == 0:
                    m, M = a.min(), a.max()
                    amin[i] = m if amin[i] is None else torch.minimum(amin[i], m)  # type: ignore[arg-type]
                    amax[i] = M if amax[i] is None else torch.maximum(amax[i], M)  # type: ignore[arg-type]
                clips.see(i, a)
        clips.done()
    lo = [clips.value(q) for q, _ in bounds]
    hi = [clips.value(q) for _, q in bounds]
    # min / max of clamp(|tau_i|, lo_i, hi_i): clamping is monotone, so they are the clamped min / max
    cmin = [torch.clamp(amin[i], min=lo[i], max=hi[i]) for i in range(n)]  # type: ignore[arg-type]
    cmax = [torch.clamp(amax[i], min=lo[i], max=hi[i]) for i in range(n)]  # type: ignore[arg-type]

    def betas(blocks: list[Tensor]) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        flat = [t.to(work).reshape(-1) for t in blocks]
        total = torch.zeros_like(flat[0])
        for x in flat:
            total += x
        for i, x in enumerate(flat):
            a = torch.clamp(x.abs(), min=lo[i], max=hi[i])
            if bool(cmax[i] > cmin[i]):
                normed = (a - cmin[i]) / (cmax[i] - cmin[i])
            else:
                normed = torch.zeros_like(a)
            intra = torch.exp(n * (normed.square() - 1.0))
            del normed
            beta = intra * torch.tanh(x * total)
            del intra
            yield i, x, a, beta

    cuts = _OrderStats(work)
    cut_ids = [cuts.want(i, cut_index) for i in range(n)]
    top: list[Tensor | None] = [None] * n
    for _ in range(cuts.passes):
        for blocks in src.passes():
            for i, _x, _a, beta in betas(blocks):
                if cuts.step == 0:
                    M = beta.max()
                    top[i] = M if top[i] is None else torch.maximum(top[i], M)  # type: ignore[arg-type]
                cuts.see(i, beta)
        cuts.done()
    cut = [cuts.value(q) for q in cut_ids]
    for blocks in src.passes():
        shape = blocks[0].shape
        numerator = torch.zeros(shape.numel(), dtype=work, device=blocks[0].device)
        denominator = torch.zeros_like(numerator)
        for i, x, a, beta in betas(blocks):
            if bool(top[i] > cut[i]):  # type: ignore[operator]
                scale = (beta.clamp(min=cut[i]) - cut[i]) / (top[i] - cut[i])  # type: ignore[operator]
            else:
                scale = torch.zeros_like(beta)
            del beta
            numerator += w[i] * scale * torch.sign(x) * a
            denominator += scale
        del blocks
        yield (numerator / denominator.clamp(min=1e-12)).reshape(shape).to(dtype)


def _dare_linear_blocks(source: BlockSource, **options: object) -> Iterator[Tensor]:
    """:func:`dare_blocks` with ``combine="linear"``."""
    return dare_blocks(source, combine="linear", **options)  # type: ignore[arg-type]


def _dare_ties_blocks(source: BlockSource, **options: object) -> Iterator[Tensor]:
    """:func:`dare_blocks` with ``combine="ties"``."""
    return dare_blocks(source, combine="ties", **options)  # type: ignore[arg-type]


BLOCK_METHODS: dict[str, Callable[..., Iterator[Tensor]]] = {
    "ties": ties_blocks,
    "dare_linear": _dare_linear_blocks,
    "dare_ties": _dare_ties_blocks,
    "pcb": pcb_blocks,
}
"""Block-wise forms of the methods in :data:`METHODS` that need whole-tensor statistics (the
entry-wise ``task_arithmetic`` and ``weighted_average`` can simply be called on each block):
``fn(source, numel=..., weights=..., **options)`` yields the merged task vector block by block."""
