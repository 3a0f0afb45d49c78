"""Merging math: each method against PEFT's merge_utils, mergekit (when installed) or an
independent entry-by-entry transcription of the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch

from paretune.errors import ConfigError
from paretune.merging import (
    METHODS,
    dare,
    pcb,
    search_lambda,
    task_arithmetic,
    ties,
    weighted_average,
)
from paretune.merging.blockwise import BLOCK_METHODS, dare_blocks, pcb_blocks, ties_blocks

peft_merge = pytest.importorskip("peft.utils.merge_utils")


def _tvs(n: int = 3, shape=(7, 9), seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


WEIGHTS = [0.7, 1.3, 0.5]


# ------------------------------------------------------------------------------------------
# task arithmetic, weighted average


def test_task_arithmetic_equals_peft_and_sum():
    tvs = _tvs()
    ours = task_arithmetic(tvs, weights=WEIGHTS)
    ref = peft_merge.task_arithmetic(tvs, torch.tensor(WEIGHTS, dtype=torch.float64))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(task_arithmetic(tvs), tvs[0] + tvs[1] + tvs[2])
    torch.testing.assert_close(task_arithmetic(tvs, weights=[1, -1, 0]), tvs[0] - tvs[1])


def test_weighted_average():
    tvs = _tvs()
    torch.testing.assert_close(weighted_average(tvs), (tvs[0] + tvs[1] + tvs[2]) / 3)
    expected = (0.7 * tvs[0] + 1.3 * tvs[1] + 0.5 * tvs[2]) / 2.5
    torch.testing.assert_close(weighted_average(tvs, weights=WEIGHTS), expected)


def test_half_precision_in_half_out():
    tvs = _tvs(dtype=torch.bfloat16)
    for name, fn in METHODS.items():
        kwargs = {"density": 0.5, "seed": 0} if name.startswith("dare") else {}
        out = fn(tvs, **kwargs)
        assert out.dtype == torch.bfloat16 and out.shape == tvs[0].shape, name


# ------------------------------------------------------------------------------------------
# TIES


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_equals_peft(majority_sign, density):
    tvs = _tvs(seed=1)
    ours = ties(tvs, density=density, weights=WEIGHTS, majority_sign=majority_sign)
    ref = peft_merge.ties(
        tvs, torch.tensor(WEIGHTS, dtype=torch.float64), density, majority_sign_method=majority_sign
    )
    torch.testing.assert_close(ours, ref)


def test_ties_sign_methods_differ_on_a_worked_example():
    # one entry, three tasks: +1, +1, -5. Mass elects -, count elects +.
    tvs = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    assert ties(tvs, density=1.0, majority_sign="total").item() == -5.0
    assert ties(tvs, density=1.0, majority_sign="frequency").item() == 1.0  # mean of +1, +1


def test_ties_trims_exactly_k_entries_with_ties_in_index_order():
    x = torch.tensor([3.0, -1.0, 2.0, -2.0, 2.0, 0.5])  # density 0.5 keeps 3: 3 and the first two 2s
    out = ties([x], density=0.5)
    torch.testing.assert_close(out, torch.tensor([3.0, 0.0, 2.0, -2.0, 0.0, 0.0]))
    # a tiny tensor keeps at least one entry
    torch.testing.assert_close(ties([x], density=0.01), torch.tensor([3.0, 0, 0, 0, 0, 0]))


def test_ties_density_one_single_task_is_identity():
    (tv,) = _tvs(n=1, dtype=torch.float32)
    torch.testing.assert_close(ties([tv], density=1.0), tv, rtol=0, atol=0)


def test_ties_equals_mergekit():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    tvs = _tvs(seed=2, dtype=torch.float32)
    base = torch.randn(tvs[0].shape, generator=torch.Generator().manual_seed(9))
    group = TensorGroup.from_tensors([base] + [base + t for t in tvs], base_index=0)
    ids = [e.id for e in group.non_base]
    merged = registry.get("ties").merge_group(
        group,
        weight={i: 1.0 for i in ids},
        density={i: 0.3 for i in ids},
        normalize=True,
        rescale=False,
        int8_mask=False,
        **{"lambda": 1.0},
    )
    torch.testing.assert_close(base + ties([base + t - base for t in tvs], density=0.3), merged)


# ------------------------------------------------------------------------------------------
# DARE: PEFT draws its masks from the global generator (torch.bernoulli), so seeding the global
# generator with s before PEFT's call gives it the same draws as ours with seed=s.


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_equals_peft_with_the_same_seed(combine):
    tvs = _tvs(seed=3)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    ours = dare(tvs, density=0.4, weights=WEIGHTS, combine=combine, seed=123)
    torch.manual_seed(123)
    if combine == "linear":
        ref = peft_merge.dare_linear(tvs, w, 0.4)
    else:
        ref = peft_merge.dare_ties(tvs, w, 0.4, majority_sign_method="total")
    torch.testing.assert_close(ours, ref)
    # without generator or seed the global generator is used, as in PEFT
    torch.manual_seed(123)
    torch.testing.assert_close(dare(tvs, density=0.4, weights=WEIGHTS, combine=combine), ref)


def test_dare_ties_frequency_equals_peft():
    tvs = _tvs(seed=4)
    ours = METHODS["dare_ties"](tvs, density=0.6, seed=5, majority_sign="frequency")
    torch.manual_seed(5)
    ref = peft_merge.dare_ties(tvs, torch.ones(3, dtype=torch.float64), 0.6, "frequency")
    torch.testing.assert_close(ours, ref)


def test_dare_drops_and_rescales():
    (tv,) = _tvs(n=1, shape=(200, 50), seed=6)
    out = dare([tv], density=0.25, seed=0)
    kept = out != 0
    assert 0.2 < kept.double().mean().item() < 0.3
    torch.testing.assert_close(out[kept], tv[kept] / 0.25)


def test_dare_is_reproducible():
    tvs = _tvs(seed=7)
    a = METHODS["dare_linear"](tvs, density=0.5, seed=1)
    torch.testing.assert_close(a, dare(tvs, density=0.5, seed=1), rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(a, dare(tvs, density=0.5, generator=g), rtol=0, atol=0)
    assert not torch.equal(a, dare(tvs, density=0.5, seed=2))
    torch.testing.assert_close(dare(tvs, density=1.0), task_arithmetic(tvs))


# ------------------------------------------------------------------------------------------
# PCB against an entry-by-entry transcription of the equations (Du et al. 2024, with the
# reference code's order statistics), in Python floats.


def _pcb_by_hand(tvs, ratio, clip, lams):
    rows = [[float(v) for v in t.reshape(-1).tolist()] for t in tvs]
    n, d = len(rows), len(rows[0])
    total = [sum(rows[i][k] for i in range(n)) for k in range(d)]
    clipped, scales = [], []
    for i in range(n):
        mags = [abs(v) for v in rows[i]]
        s = sorted(mags)
        lo, hi = s[int(d * clip)], s[int(d * (1 - clip) - 1)]
        a = [min(max(m, lo), hi) for m in mags]
        clipped.append([math.copysign(a[k], rows[i][k]) if rows[i][k] != 0 else 0.0 for k in range(d)])
        amin, amax = min(a), max(a)
        intra = [math.exp(n * ((a[k] - amin) / (amax - amin)) ** 2) for k in range(d)]
        inter = [math.tanh(rows[i][k] * total[k]) for k in range(d)]
        beta = [intra[k] * inter[k] for k in range(d)]
        cut = sorted(beta)[int(d * (1 - ratio))]
        top = max(beta)
        scales.append([(max(b, cut) - cut) / (top - cut) for b in beta])
    out = []
    for k in range(d):
        num = sum(lams[i] * scales[i][k] * clipped[i][k] for i in range(n))
        den = max(sum(scales[i][k] for i in range(n)), 1e-12)
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(tvs[0].shape)


@pytest.mark.parametrize("ratio,clip", [(0.3, 0.1), (0.1, 1e-4), (1.0, 0.0)])
def test_pcb_equals_transcription(ratio, clip):
    tvs = [t * 0.8 for t in _tvs(seed=8, shape=(5, 8))]
    ours = pcb(tvs, ratio=ratio, clip=clip, weights=WEIGHTS)
    torch.testing.assert_close(ours, _pcb_by_hand(tvs, ratio, clip, WEIGHTS))


def test_pcb_many_tasks_float32_no_overflow():
    # exp(n * 1) overflows float32 past n = 88; the shifted form must not.
    tvs = _tvs(n=100, shape=(40,), seed=9, dtype=torch.float32)
    ours = pcb(tvs, ratio=0.5)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(
        ours.double(), _pcb_by_hand([t.double() for t in tvs], 0.5, 1e-4, [1.0] * 100),
        rtol=1e-4, atol=1e-5,
    )


def test_pcb_worked_example_keeps_only_the_top_ratio():
    # one task: beta = exp(N(|x|)^2) * tanh(x^2) grows with |x|; ratio 0.5 of 4 entries keeps
    # entries above sorted(beta)[2], i.e. only the largest (the cut entry itself scores 0).
    x = torch.tensor([0.1, -0.2, 0.3, -0.4], dtype=torch.float64)
    out = pcb([x], ratio=0.5, clip=0.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -0.4], dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# lambda search


def test_search_lambda_finds_grid_optimum_within_budget():
    target = [1.2, 0.8, 1.0]
    calls = []

    def evaluate(lams):
        calls.append(list(lams))
        return -sum((a - b) ** 2 for a, b in zip(lams, target))

    best, score = search_lambda(evaluate, 3)
    assert best == pytest.approx(target) and score == pytest.approx(0.0)
    assert calls[0] == [1.0, 1.0, 1.0] and len(calls) <= 100
    assert len({tuple(c) for c in calls}) == len(calls)  # nothing scored twice
    calls.clear()
    best2, _ = search_lambda(evaluate, 3, budget=4, seed=3)
    assert len(calls) == 4 and len(best2) == 3


# ------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: task_arithmetic([]), "empty"),
        (lambda: task_arithmetic(torch.ones(3)), "list"),
        (lambda: ties([torch.ones(3), torch.ones(4)]), "shape"),
        (lambda: ties([torch.ones(3), torch.ones(3, dtype=torch.float64)]), "dtype"),
        (lambda: ties([torch.ones(3, dtype=torch.long)]), "floating"),
        (lambda: ties([torch.tensor([1.0, float("nan")])]), "NaN"),
        (lambda: ties([torch.ones(3)], density=0.0), "density"),
        (lambda: ties([torch.ones(3)], density=1.5), "density"),
        (lambda: ties([torch.ones(3)], majority_sign="mass"), "majority_sign"),
        (lambda: ties([torch.ones(3)], weights=[1.0, 2.0]), "weights"),
        (lambda: task_arithmetic([torch.ones(3)], weights=[float("inf")]), "finite"),
        (lambda: weighted_average([torch.ones(3)] * 2, weights=[1.0, -1.0]), "non-negative"),
        (lambda: dare([torch.ones(3)], density=0.5, combine="sum"), "combine"),
        (lambda: dare([torch.ones(3)], density=0.5, seed=1, generator=torch.Generator()), "not both"),
        (lambda: dare([torch.ones(3)], density=0.5, seed="a"), "seed"),
        (lambda: pcb([torch.ones(3)], ratio=0.0), "ratio"),
        (lambda: pcb([torch.ones(3)], clip=0.5), "clip"),
        (lambda: search_lambda(lambda lams: 0.0, 0), "n_tasks"),
        (lambda: search_lambda(lambda lams: 0.0, 2, grid=[]), "grid"),
        (lambda: search_lambda(lambda lams: float("nan"), 2), "finite"),
    ],
)
def test_bad_input_raises_config_error(call, words):
    with pytest.raises(ConfigError, match=words):
        call()


def test_methods_registry():
    assert set(METHODS) == {"task_arithmetic", "weighted_average", "ties", "dare_linear", "dare_ties", "pcb"}


@pytest.mark.slow
def test_embedding_sized_tensors_over_quantile_limit():
    # 49152 x 576 = 28.3M entries: past torch.quantile's 16M limit.
    g = torch.Generator().manual_seed(0)
    tvs = [torch.randn(49152, 576, generator=g) * 1e-3 for _ in range(2)]
    out = ties(tvs, density=0.2)
    assert out.shape == tvs[0].shape and torch.isfinite(out).all()
    out = pcb(tvs, ratio=0.1)
    assert out.shape == tvs[0].shape and torch.isfinite(out).all()
    assert 0.05 < (out != 0).float().mean().item() < 0.25


# ------------------------------------------------------------------------------------------
# block-wise forms: the whole-tensor functions above are the independent reference


def _source(tvs: list[torch.Tensor], rows: int):
    def blocks():
        for a in range(0, tvs[0].shape[0], rows):
            yield [t[a : a + rows] for t in tvs]

    return blocks


def _streamed(fn, tvs, rows, **kw) -> torch.Tensor:
    parts = list(fn(_source(tvs, rows), numel=tvs[0].numel(), **kw))
    assert len(parts) == -(-tvs[0].shape[0] // rows)
    return torch.cat([p.reshape(-1) for p in parts]).reshape(tvs[0].shape)


def _tied_tvs(dtype, shape=(23, 7)) -> list[torch.Tensor]:
    """Random task vectors with many entries tied at the trim threshold, zeros and -0.0."""
    tvs = _tvs(3, shape, seed=5, dtype=dtype)
    tvs[0][2:12] = 0.75  # a run of equal magnitudes across several blocks
    tvs[0][12:14] = -0.75
    tvs[1] = tvs[1].round()  # few distinct values: ties at every cut
    tvs[2][0] = -0.0
    tvs[2][1] = 0.0
    return tvs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [2, 23])
def test_ties_blocks_identical_to_ties(dtype, rows):
    tvs = _tied_tvs(dtype)
    for density in (0.05, 0.2, 0.5, 1.0):
        for ms in ("total", "frequency"):
            want = ties(tvs, density=density, weights=WEIGHTS, majority_sign=ms)
            got = _streamed(ties_blocks, tvs, rows, density=density, weights=WEIGHTS, majority_sign=ms)
            assert got.dtype == want.dtype and torch.equal(got, want), (density, ms)
    # the tie-break really splits a run of equal magnitudes: k lands inside the run of 0.75s
    x = tvs[0].clamp(-0.5, 0.5)
    x[2:12] = 0.75
    x[12:14] = -0.75  # 84 entries tied at 0.75, all others smaller
    k = 5 * 7
    density = k / x.numel() + 1e-9
    got = _streamed(ties_blocks, [x], rows, density=density)
    assert int((got != 0).sum()) == k
    assert torch.equal(got, ties([x], density=density))
    assert torch.equal(got.reshape(-1).nonzero().reshape(-1), torch.arange(2 * 7, 2 * 7 + k))  # index order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dare_blocks_identical_to_dare_and_advance_the_generator(dtype):
    tvs = _tvs(3, (19, 5), seed=2, dtype=dtype)
    for combine in ("linear", "ties"):
        for rows in (1, 4, 19):
            want = dare(tvs, density=0.4, weights=WEIGHTS, combine=combine, seed=11)
            got = _streamed(dare_blocks, tvs, rows, density=0.4, weights=WEIGHTS, combine=combine, seed=11)
            assert torch.equal(got, want), (combine, rows)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = dare(tvs, density=0.5, generator=g1)
    got = _streamed(dare_blocks, tvs, 2, density=0.5, generator=g2)
    assert torch.equal(got, want)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # left at the same state
    torch.manual_seed(9)
    want = dare(tvs, density=0.5)
    torch.manual_seed(9)
    assert torch.equal(_streamed(dare_blocks, tvs, 3, density=0.5), want)  # the global generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [2, 29])
def test_pcb_blocks_identical_to_pcb(dtype, rows):
    tvs = _tvs(3, (29, 6), seed=4, dtype=dtype)
    tvs[1][3:9] = 0.25  # ties at the clip bounds and the cut
    tvs[2][0] = 0.0
    for ratio, clip in ((0.1, 0.0), (0.1, 1e-4), (0.5, 0.1), (1.0, 0.45)):
        want = pcb(tvs, ratio=ratio, clip=clip, weights=WEIGHTS)
        got = _streamed(pcb_blocks, tvs, rows, ratio=ratio, clip=clip, weights=WEIGHTS)
        assert torch.equal(got, want), (ratio, clip)


def test_blocks_larger_than_one_block_float32():
    # 1000 x 40 float32 in 250-row blocks: four blocks of 40 kB
    tvs = _tvs(2, (1000, 40), seed=8, dtype=torch.float32)
    tvs = [t * 1e-3 for t in tvs]
    assert torch.equal(_streamed(ties_blocks, tvs, 250, density=0.2), ties(tvs, density=0.2))
    assert torch.equal(_streamed(pcb_blocks, tvs, 250, ratio=0.1), pcb(tvs, ratio=0.1))
    assert torch.equal(_streamed(dare_blocks, tvs, 250, density=0.5, combine="ties", seed=0),
                       dare(tvs, density=0.5, combine="ties", seed=0))


def test_block_methods_registry_and_errors():
    assert set(BLOCK_METHODS) == set(METHODS) - {"task_arithmetic", "weighted_average"}
    tvs = _tvs(2, (6, 3))
    got = torch.cat(list(BLOCK_METHODS["dare_ties"](_source(tvs, 2), numel=18, density=0.5, seed=1)))
    assert torch.equal(got, dare(tvs, density=0.5, combine="ties", seed=1).reshape(-1, 3))
    with pytest.raises(ConfigError, match="numel"):
        list(ties_blocks(_source(tvs, 2), numel=17))
    with pytest.raises(ConfigError, match="no blocks"):
        list(pcb_blocks(lambda: iter([]), numel=0))
    with pytest.raises(ConfigError, match="NaN"):
        bad = [tvs[0], tvs[1].clone()]
        bad[1][5, 0] = float("inf")
        list(ties_blocks(_source(bad, 2), numel=18))
    with pytest.raises(ConfigError, match="source"):
        list(ties_blocks(None, numel=18))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="density"):
        list(dare_blocks(_source(tvs, 2), numel=18, density=0.0))
    with pytest.raises(ConfigError, match="clip"):
        list(pcb_blocks(_source(tvs, 2), numel=18, clip=0.6))
