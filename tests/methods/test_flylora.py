"""FlyLoRA: the frozen sparse A, top-k routing (exactly k ranks per token), the forward pass against
an independent computation, the load-balancing bias d (hand example, save / load, checkpoint
resume), per-sample serving, refused options, and a training run in which rank use evens out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.inject import hosts
from paretune.errors import AdapterFileError, ParetuneError
from paretune.methods.flylora import FlyLoraConfig, sparse_projection
from paretune.training import train

from layer_chain import (CHAIN_SHAPES, assert_bad_options_refused, assert_only_these_get_gradients, chain,
                         deltas, left_unchanged)
import tiny_transformers as tiny


def _fly(model: nn.Module, **options) -> nn.Module:
    return paretune.adapt(model, "flylora", **{"r": 8, "k": 3, **options})


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 3) -> None:
    """Random B and d on every delta (d: as training would leave it)."""
    g = torch.Generator().manual_seed(seed)
    for d in deltas(model).values():
        d.B.copy_(torch.randn(d.B.shape, generator=g))
        d.d.copy_(0.3 * torch.randn(d.d.shape, generator=g))


def _reference(delta, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """base_out + s·B (y ⊙ mask) for a Linear host, the mask from a full sort of |y + d|."""
    a, b, dvec = delta.A.double(), delta.B.double(), delta.d.double()
    y = x.double() @ a.T
    order = torch.argsort((y + dvec).abs(), dim=-1, descending=True)[..., : delta.k]
    flat_mask = torch.zeros(y.numel() // delta.r, delta.r, dtype=y.dtype)
    for row, idx in enumerate(order.reshape(-1, delta.k)):
        flat_mask[row, idx] = 1.0
    s = 2.0 if delta.config.alpha is None else delta.config.alpha / delta.r  # alpha = 2r by default
    return base_out.double() + s * (y * flat_mask.reshape(y.shape)) @ b.T


# -- A, init, counts -------------------------------------------------------------------------------

def test_A_is_sparse_gaussian_with_p_nonzeros_per_row():
    model = paretune.adapt(nn.Sequential(nn.Linear(512, 64)), "flylora")  # r 32, k 8: p = 512·8/32 = 128
    d = deltas(model)["0"]
    assert d.A.shape == (32, 512) and not d.A.requires_grad
    assert (torch.count_nonzero(d.A, dim=1) == 128).all()
    values = d.A[d.A != 0].double()
    assert values.numel() == 32 * 128
    assert abs(values.std().item() - 1 / 32) < 0.05 / 32  # N(0, 1/r²): std 1/r (4096 draws)
    assert abs(values.mean().item()) < 0.1 / 32
    # density overrides p; at least one non-zero per row; never more than d_in
    model = paretune.adapt(nn.Sequential(nn.Linear(40, 4)), "flylora", r=8, k=2, density=0.25)
    assert (torch.count_nonzero(deltas(model)["0"].A, dim=1) == 10).all()
    assert FlyLoraConfig(r=32, k=1).nonzeros(8) == 1 and FlyLoraConfig(r=4, k=4).nonzeros(6) == 6


def test_A_is_regenerated_from_the_seed_and_differs_per_layer():
    one, two = _fly(chain()), _fly(chain())
    a1 = [d.A for d in deltas(one).values()]
    a2 = [d.A for d in deltas(two).values()]
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not torch.equal(a1[2][:, :8], a1[0][:, :8])  # 8 -> 12 and 8 -> 16: same d_in, other draw
    other = [d.A for d in deltas(_fly(chain(), seed=1)).values()]
    assert not torch.equal(other[0], a1[0])
    assert torch.equal(a1[0], sparse_projection(8, 8, 3, 0 * 1_000_003 + 0))


def test_counts_equal_the_formula_and_B_and_d_are_stored(tmp_path):
    model = _fly(chain())
    cost = paretune.count(model)
    expected = sum(d_out * 8 for d_out, _ in CHAIN_SHAPES)
    assert cost["trainable"] == cost["formula"] == expected
    assert cost["stored_bytes"] == 4 * (expected + 8 * len(CHAIN_SHAPES))  # float32 B and d; A regenerated
    for d in deltas(model).values():
        assert set(d.stored_state()) == {"B", "d"}
        assert not d.d.requires_grad


def test_zero_start_and_gradients_only_on_B(make_llama, llama_batch):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "flylora", r=8, k=2)
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)
    _randomise(model)
    model(llama_batch).logits.sum().backward()
    assert_only_these_get_gradients(model, (".B",), bank=False)


# -- routing -------------------------------------------------------------------------------------

def _record_masks(model: nn.Module) -> list[torch.Tensor]:
    masks: list[torch.Tensor] = []
    for d in deltas(model).values():
        route = d.route

        def recording(y, route=route):
            m = route(y)
            masks.append(m)
            return m

        d.route = recording
    return masks


def test_exactly_k_ranks_are_active_per_token(make_llama, llama_batch, make_mixed, mixed_batch):
    model = paretune.adapt(make_llama(), "flylora", r=8, k=3)
    _randomise(model)
    masks = _record_masks(model)
    with torch.no_grad():
        model(llama_batch)
    assert len(masks) == len(deltas(model)) == 14
    for m in masks:
        assert m.shape == (*llama_batch.shape, 8)
        assert ((m == 0) | (m == 1)).all() and (m.sum(-1) == 3).all()
    # Embedding, Conv1D and Conv2d hosts: k of r along the rank (channel) dimension at every position
    mixed = paretune.adapt(make_mixed(), "flylora", r=4, k=2, targets=["emb", "proj", "conv"])
    masks = _record_masks(mixed)
    with torch.no_grad():
        mixed(*mixed_batch)
    dims = [-1, -1, 1]
    for m, dim in zip(masks, dims):
        assert (m.sum(dim) == 2).all()
    assert masks[2].shape == (2, 4, 6, 6)


def test_forward_matches_an_independent_computation():
    model = _fly(chain(), alpha=5.0, score="abs")  # the reference code's score, sorted by hand below
    _randomise(model)
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    d = deltas(model)["0"]
    base_out = model[0].base(x)
    with torch.no_grad():
        got = d(x, base_out)
    torch.testing.assert_close(got.double(), _reference(d, x, base_out), atol=1e-5, rtol=1e-5)
    # the chosen ranks are the k largest |y + d|: a kept rank outscores every dropped one
    y = x @ d.A.T
    score = (y + d.d).abs()
    mask = d.route(y)
    assert (score.masked_fill(mask == 0, float("inf")).amin(-1) >= score.masked_fill(mask == 1, -1).amax(-1)).all()


def test_other_scores_rank_by_abs_plus_bias_and_signed():
    y = torch.tensor([[0.5, -0.9, 0.2, -0.8]])
    # d = (0, 1, 0, .1): |y + d| = .5 .1 .2 .7; |y| + d = .5 1.9 .2 .9; y + d = .5 .1 .2 -.7
    for score, expected in [("abs", [0, 3]), ("abs-plus-bias", [1, 3]), ("signed", [0, 2])]:
        model = paretune.adapt(nn.Sequential(nn.Linear(4, 2)), "flylora", r=4, k=2, score=score)
        d = deltas(model)["0"]
        with torch.no_grad():
            d.d.copy_(torch.tensor([0.0, 1.0, 0.0, 0.1]))
        assert sorted(d.route(y).nonzero()[:, 1].tolist()) == expected, score


# -- the bias d ------------------------------------------------------------------------------------

def test_bias_update_follows_the_formula_on_a_hand_example():
    """r = 4, k = 1, A = I: token (5,0,0,0) and (4,0,0,0) pick rank 0, (0,3,0,0) rank 1. Counts
    c = (2, 1, 0, 0), mean 0.75: d ← d + u·sign(0.75 − c) = u·(−1, −1, +1, +1)."""
    model = paretune.adapt(nn.Sequential(nn.Linear(4, 3)), "flylora", r=4, k=1, u=0.25)
    d = deltas(model)["0"]
    with torch.no_grad():
        d.A.copy_(torch.eye(4))
    x = torch.tensor([[5.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 3.0, 0, 0]])
    model.eval()
    model(x)
    assert d.counts.sum() == 0  # no counting outside training mode
    model.train()
    model(x)
    assert d.counts.tolist() == [2, 1, 0, 0]
    d.on_step(1, 10)
    torch.testing.assert_close(d.d, torch.tensor([-0.25, -0.25, 0.25, 0.25]))
    assert d.counts.sum() == 0
    d.on_step(1, 10)  # a step already handled changes nothing
    torch.testing.assert_close(d.d, torch.tensor([-0.25, -0.25, 0.25, 0.25]))
    # two forwards in one step accumulate: c = (0, 0, 4, 2) -> sign(1.5 - c) = (+, +, -, -)
    with torch.no_grad():
        d.d.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    z = torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, 2.0], [0, 0, 0, 30.0]])
    model(z)
    model(z)
    assert d.counts.tolist() == [0, 0, 4, 2]
    d.on_step(2, 10)
    torch.testing.assert_close(d.d, torch.tensor([0.25, 0.25, 9.75, -0.25]))
    # d only routes: the kept value is y, not y + d (rank 2 chosen with y_2 = 0 adds nothing)
    with torch.no_grad():
        d.B.fill_(1.0)
        d.d.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
        base = model[0].base(x[:1])
        assert torch.equal(model(x[:1]), base)


def test_save_load_round_trip_keeps_B_and_d(tmp_path):
    model = _fly(chain())
    _randomise(model)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    paretune.save(model, tmp_path / "a")
    fresh = chain()
    paretune.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    for name, d in deltas(model).items():
        loaded = deltas(fresh)[name]
        assert torch.equal(loaded.d, d.d) and torch.equal(loaded.B, d.B) and torch.equal(loaded.A, d.A)
    # A comes from the seed: a file made with another seed does not hot-swap into this adapter
    other = _fly(chain(), seed=4)
    paretune.save(other, tmp_path / "b")
    with pytest.raises(AdapterFileError, match="seed"):
        paretune.hot_swap(fresh, tmp_path / "b")


def test_merge_is_refused():
    model = _fly(chain())
    with pytest.raises(ParetuneError, match="input-dependent"):
        paretune.merge(model)


def test_per_sample_runs_each_row_with_its_adapter():
    model = chain()
    paretune.adapt(model, "flylora", r=8, k=3, name="a", seed=1)
    paretune.adapt(model, "flylora", r=8, k=2, name="b", seed=2)
    for n in ("a", "b"):
        with torch.no_grad():
            g = torch.Generator().manual_seed(len(n) + ord(n))
            for d in deltas(model, n).values():
                d.B.copy_(torch.randn(d.B.shape, generator=g))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    alone = {}
    with torch.no_grad():
        for n in ("a", "b", None):
            paretune.set_active(model, [n] if n else [])
            alone[n] = model(x)
        with paretune.per_sample(model, ["a", "b", None]):
            mixed = model(x)
    for row, n in enumerate(("a", "b", None)):
        torch.testing.assert_close(mixed[row], alone[n][row], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [{"k": 9}, {"k": 0}, {"k": -1}, {"u": -1e-3}, {"r": 0}, {"density": 0.0},
                                 {"density": 1.5}, {"alpha": -1.0}, {"dropout": 1.0}, {"score": "l2"},
                                 {"seed": -1}])
def test_bad_options_are_refused(bad):
    assert_bad_options_refused("flylora", {"r": 8, **bad})


def test_refused_adapt_leaves_the_model_unchanged():
    model = chain()
    x = torch.randn(2, 8)
    with left_unchanged(model, x):
        with pytest.raises(ParetuneError, match="at most r=4"):
            paretune.adapt(model, "flylora", r=4, k=5)


# -- training ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return tiny.minilm_tokenizer()


def _bert():
    """A 2-layer BERT classifier, hidden 32, over the MiniLM vocabulary."""
    return tiny.build_bert(hidden=32, layers=2, vocab=tiny.minilm_tokenizer().vocab_size)


@torch.no_grad()
def rank_use_spread(model: nn.Module, tokenizer) -> float:
    """Mean over the adapted layers of the coefficient of variation (std / mean) of the per-rank
    selection counts over one pass of the data (counted in training mode, then cleared)."""
    ds = [h.deltas["default"] for _, h in hosts(model)]
    was = model.training
    model.train()
    for d in ds:
        d.counts.zero_()
    enc = tokenizer([row["text"] for row in tiny.COLOURS], padding=True, return_tensors="pt")
    model(**enc)
    spreads = []
    for d in ds:
        c = d.counts.double()
        spreads.append((c.std(unbiased=False) / c.mean()).item())
        d.counts.zero_()
    model.train(was)
    return sum(spreads) / len(spreads)


TRAIN = dict(steps=60, batch_size=16, lr=1e-2, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("score", ["abs", "abs-plus-bias", "signed"])
def test_rank_use_evens_out_during_training(tokenizer, score):
    """A 2-layer BERT (hidden 32), FlyLoRA on every Linear, r = 8, k = 2, u = 0.01, 60 steps: the
    spread of rank use at the end against the start (the same adapter before training: B = 0, d = 0).
    The balancing scores (the default |y| + d, and y + d) narrow it; the reference code's |y + d| is
    printed, not asserted (see the module docstring: there the bias of a rank used more than the
    mean can run away)."""
    options = {"r": 8, "k": 2, "u": 0.01, "score": score}
    start = rank_use_spread(paretune.adapt(_bert(), "flylora", **options), tokenizer)
    res = train(_bert(), tiny.COLOURS, tokenizer=tokenizer, method="flylora", options=options, **TRAIN)
    end = rank_use_spread(res.model, tokenizer)
    biases = [h.deltas["default"].d for _, h in hosts(res.model)]
    print(f"\nflylora score={score}: rank-use CV {start:.3f} -> {end:.3f}; "
          f"max |d| {max(b.abs().max().item() for b in biases):.2f}; loss {res.history[0]:.3f} -> {res.history[-1]:.3f}")
    assert all(b.abs().max() > 0 for b in biases)  # the trainer ran the update
    if score != "abs":
        assert end < 0.7 * start


def test_rank_use_evens_out_quickly(tokenizer):
    """The default-run version of the measured test: 25 steps with the default |y| + d narrows the spread."""
    options = {"r": 8, "k": 2, "u": 0.02}
    start = rank_use_spread(paretune.adapt(_bert(), "flylora", **options), tokenizer)
    res = train(_bert(), tiny.COLOURS, tokenizer=tokenizer, method="flylora", options=options,
                **{**TRAIN, "steps": 25})
    end = rank_use_spread(res.model, tokenizer)
    print(f"\nflylora abs-plus-bias, 25 steps: rank-use CV {start:.3f} -> {end:.3f}")
    assert end < 0.8 * start


def test_checkpoint_resume_keeps_d(tokenizer, tmp_path):
    kw = dict(tokenizer=tokenizer, method="flylora", options={"r": 4, "k": 2, "u": 0.01}, targets=["query", "value"],
              steps=6, batch_size=8, lr=1e-2, progress=False, seed=2)
    full = train(_bert(), tiny.COLOURS, **kw).model
    ck = str(tmp_path / "ck")
    with pytest.raises(tiny.Interrupted):
        train(_bert(), tiny.COLOURS, checkpoint_dir=ck, checkpoint_every=3, on_step=tiny.interrupt_at(4),
              **kw)
    resumed = train(_bert(), tiny.COLOURS, checkpoint_dir=ck, checkpoint_every=3, resume=True,
                    **kw).model
    for (name, h), (_, g) in zip(hosts(full), hosts(resumed)):
        a, b = h.deltas["default"], g.deltas["default"]
        assert a.last_step == b.last_step == 6, name
        assert a.d.abs().sum() > 0
        torch.testing.assert_close(b.d, a.d, atol=0, rtol=0)
        torch.testing.assert_close(b.B, a.B, atol=1e-6, rtol=1e-5)
