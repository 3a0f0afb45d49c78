"""MoSA: the training pass against the bottleneck formula with W_up ⊙ M_e written out by hand, the
partition (disjoint, equal, covering W_up), the per-step draws (reproducible, idempotent on_step),
evaluation with the full adapter, counts, save/load, the merge refusal and bad input.

The authors' code (a ViT training repository) cannot run on these models; the reference is the
formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError
from paretune.methods.mosa import MosaConfig

import tiny_transformers as tiny


def deltas(model: nn.Module) -> list:
    return [m.deltas["default"] for m in model.modules() if isinstance(m, Host)]


def single_linear(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8))
    paretune.adapt(model, "mosa", targets=["0"], **{"bottleneck": 4, **options})
    delta = deltas(model)[0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        delta.up.normal_(0, 0.5, generator=g)
        delta.up_bias.normal_(0, 0.5, generator=g)
        delta.down_bias.normal_(0, 0.5, generator=g)
    return model, delta


@torch.no_grad()
def series_by_hand(delta, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    base = delta.geometry.base
    h = x @ base.weight.T + base.bias
    return h + torch.relu(h @ delta.down.T + delta.down_bias) @ up.T + delta.up_bias


def test_starts_equal_to_the_base():
    tiny.assert_starts_as_base("mosa")


@pytest.mark.parametrize("partition", ["entries", "units"])
@pytest.mark.parametrize("n", [2, 4])
def test_partition_is_disjoint_equal_and_covers_the_up_projection(partition, n):
    _, delta = single_linear(n_experts=n, partition=partition)
    masks = torch.stack([delta.mask(e) for e in range(n)])
    assert torch.equal(masks.sum(0), torch.ones_like(delta.up))  # each entry in exactly one part
    assert all(float(m.mean()) == pytest.approx(1 / n) for m in masks)  # the stated fraction
    if partition == "units":  # whole columns (hidden units): m / n units each
        for m in masks:
            assert torch.equal(m, m[:1].expand_as(m)) and int(m[0].sum()) == delta.m // n


def test_training_pass_uses_one_sparse_adapter_and_eval_the_full_one():
    model, delta = single_linear(n_experts=4)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    seen = set()
    for step in range(12):
        delta.on_step(step, 12)
        e = delta.expert()
        seen.add(e)
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(model(x), series_by_hand(delta, x, delta.up * delta.mask(e)), atol=1e-6, rtol=0)
            assert float(delta.mask().mean()) == pytest.approx(0.25)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), series_by_hand(delta, x, delta.up), atol=1e-6, rtol=0)
    assert len(seen) > 1  # the active sparse adapter changes from step to step


def test_only_the_active_part_of_the_up_projection_gets_gradients():
    model, delta = single_linear(n_experts=4)
    delta.on_step(5, 10)
    model.train()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(4))
    model(x).pow(2).sum().backward()
    mask = delta.mask()
    assert delta.up.grad[mask == 0].abs().max() == 0
    assert delta.up.grad[mask == 1].abs().sum() > 0
    assert delta.down.grad.abs().sum() > 0 and delta.up_bias.grad.abs().sum() > 0


def test_draws_are_reproducible_and_on_step_is_idempotent():
    _, a = single_linear(seed=7)
    _, b = single_linear(seed=7)
    _, c = single_linear(seed=8)
    draws = []
    for delta in (a, b, c):
        seq = []
        for step in range(16):
            delta.on_step(step, 16)
            delta.on_step(step, 16)  # a resumed run calls it again with the same step
            seq.append(delta.expert())
        draws.append(seq)
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert torch.equal(a.owner, b.owner) and not torch.equal(a.owner, c.owner)


def test_layers_draw_independently():
    model = tiny.build_llama16()
    paretune.adapt(model, "mosa", n_experts=4)
    ds = deltas(model)
    assert len(ds) == 2
    draws = [[d.expert() for step in range(20) if d.on_step(step, 20) is None] for d in ds]
    assert draws[0] != draws[1]


def test_trainer_advances_the_draws():
    from paretune.training import train

    tok = tiny.minilm_tokenizer()
    res = train(tiny.build_bert(vocab=tok.vocab_size), tiny.COLOURS[:4], tokenizer=tok, method="mosa",
                options={"bottleneck": 4}, steps=3, batch_size=4, lr=1e-2, progress=False)
    (delta,) = deltas(res.model)
    assert delta.step == 3
    assert delta.up.abs().sum() > 0


def test_count_is_the_bottleneck_formula():
    model = tiny.build_llama16()
    paretune.adapt(model, "mosa", bottleneck=4, n_experts=2)
    d, m = 16, 4
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == len(deltas(model)) * (2 * d * m + m + d)
    assert cost["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_save_load_round_trip(tmp_path):
    model = tiny.build_llama16()
    paretune.adapt(model, "mosa", bottleneck=4, partition="units", n_experts=2, seed=3)
    with torch.no_grad():
        for d in deltas(model):
            d.up.normal_(0, 0.3)
    fresh = tiny.assert_save_load_logits(model, tmp_path / "mosa", tiny.token_ids())
    for a, b in zip(deltas(model), deltas(fresh)):
        assert torch.equal(a.owner, b.owner)  # the partition is regenerated from the seed


def test_merge_is_refused():
    model, _ = single_linear()
    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(model)


@pytest.mark.parametrize("options", [{"n_experts": 0}, {"partition": "rows"}, {"seed": -1}, {"n_experts": 1.5}])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        MosaConfig(**options)
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ConfigError):
        paretune.adapt(model, "mosa", targets=["0"], bottleneck=4, **options)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("partition,n", [("units", 5), ("entries", 33)])
def test_more_sparse_adapters_than_parts_is_refused(partition, n):
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ConfigError, match="n_experts"):
        paretune.adapt(model, "mosa", targets=["0"], bottleneck=4, partition=partition, n_experts=n)
    assert isinstance(model[0], nn.Linear)
