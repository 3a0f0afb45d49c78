"""IncreLoRA: ΔW and the module score against their formulas, growth during training at the
scheduled steps up to the budget, checkpoint resume mid-growth, save / load and PEFT export of a
grown adapter, counts, and bad options."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import paretune
from paretune.core.inject import hosts
from paretune.errors import ConfigError
from paretune.methods.increlora import IncreLoraDelta, ranks

import tiny_transformers as tiny
from layer_chain import left_unchanged

TARGETS = ["q_proj", "v_proj"]


def _ours(model: nn.Module) -> dict[str, IncreLoraDelta]:
    return {n: h.deltas["default"] for n, h in hosts(model)}


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    for d in _ours(model).values():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _by_hand(d: IncreLoraDelta) -> torch.Tensor:
    """(s / r_cur) Σ_i b_i e_i a_iᵀ over every triplet (reserve included, with its constant e)."""
    a = torch.cat([p.detach() for p in d.A])
    b = torch.cat([p.detach() for p in d.B], dim=1)
    e = [p.detach().view(-1) for p in d.E] + ([d.reserve_e.view(-1)] if d.reserved else [])
    e = torch.cat(e)
    r_cur = sum(p.shape[0] for p in d.E)
    out = torch.zeros(d.d_out, d.d_in)
    for i in range(a.shape[0]):
        out += torch.outer(b[:, i], a[i]) * e[i]
    return d.config.alpha / r_cur * out


def test_start_shapes_reserve_and_delta_weight(make_llama, llama_batch):
    base = make_llama()
    model = make_llama()
    paretune.adapt(model, "increlora", targets=TARGETS, init_r=2, target_r=4, alpha=16)
    for d in _ours(model).values():
        assert d.chunks() == [2, 2] and d.rank == 2 and d.reserved  # target_r 4 → 2 ranks per growth
        assert torch.equal(d.reserve_e, torch.full((2, 1), 1e-5)) and d.E[0].abs().sum() == 0
        assert d.A[0].std().item() == pytest.approx(0.02, rel=0.5)
        torch.testing.assert_close(d.delta_weight(), _by_hand(d), atol=1e-12, rtol=1e-6)
    with torch.no_grad():  # the reserve's e = 1e-5 makes the start equal to the base up to ~1e-8
        torch.testing.assert_close(model(llama_batch).logits, base(llama_batch).logits, atol=1e-6, rtol=0)
    _randomise(model)
    for d in _ours(model).values():
        d.grow()
        assert d.chunks() == [2, 2, 2] and d.rank == 4 and len(d.E) == 2
        torch.testing.assert_close(d.E[1].detach(), torch.full((2, 1), 1e-5))  # the reserve's e, now trained
        torch.testing.assert_close(d.delta_weight(), _by_hand(d), atol=1e-7, rtol=1e-5)


def test_module_score_is_the_papers_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    paretune.adapt(model, "increlora", targets=["0"], init_r=2, target_r=4)
    _randomise(model)
    d = _ours(model)["0"]
    model.train()
    x, t = torch.randn(7, 6), torch.randn(7, 5)
    for _ in range(2):  # two backward passes in one step (gradient accumulation): the summed gradient
        (model(x) * t).sum().backward()
    dw = d.delta_weight().detach()
    grad = 2 * t.T @ x  # ∂L/∂ΔW of L = Σ (W + ΔW) x · t, twice
    want = float((dw * grad).abs().sum()) / math.sqrt(dw.numel())
    assert d.take_score() == pytest.approx(want, rel=1e-5)
    assert d.take_score() == 0.0  # taken once per step


def test_importance_averages():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    paretune.adapt(model, "increlora", targets=["0"], beta1=0.8, beta2=0.6)
    d = _ours(model)["0"]
    ipt = unc = 0.0
    for s in (1.0, 3.0, 2.0):
        d.update_importance(s)
        ipt = 0.8 * ipt + 0.2 * s
        unc = 0.6 * unc + 0.4 * abs(s - ipt)
    assert d.ema_ipt == pytest.approx(ipt) and d.ema_unc == pytest.approx(unc)
    assert d.importance() == pytest.approx(ipt * unc)


def test_count_start_current_and_max(make_llama):
    model = make_llama()
    paretune.adapt(model, "increlora", targets=TARGETS, init_r=1, target_r=3, incre_rank_num=1)
    deltas = list(_ours(model).values())
    start = sum(1 * (d.d_in + d.d_out + 1) + 1 * (d.d_in + d.d_out) for d in deltas)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == start
    widest = max(d.d_out + d.d_in + 1 for d in deltas)
    assert cost["max_trainable"] == start + 2 * len(deltas) * widest
    deltas[0].grow()
    deltas[0].grow()
    grown = paretune.count(model)
    assert grown["trainable"] == grown["formula"] == sum(d.formula_now() for d in deltas) \
        == start + 2 * (deltas[0].d_in + deltas[0].d_out + 1)
    assert grown["max_trainable"] == cost["max_trainable"]


@pytest.mark.parametrize("options, option", [
    ({"incre_interval": 0}, "incre_interval"),
    ({"init_r": 4, "target_r": 2}, "target_r"),
    ({"top_h": 0}, "top_h"),
    ({"incre_rank_num": 0}, "incre_rank_num"),
    ({"init_warmup": -1}, "init_warmup"),
    ({"beta2": 0.0}, "beta2"),
])
def test_bad_options_are_config_errors_and_leave_the_model(make_llama, options, option):
    model = make_llama()
    with left_unchanged(model), pytest.raises(ConfigError, match=option):
        paretune.adapt(model, "increlora", targets=TARGETS, **options)


def test_reference_rank_step_table():
    from paretune.methods.increlora import IncreLoraConfig

    assert [IncreLoraConfig(target_r=t).step_ranks for t in (2, 4, 6, 8, 5)] == [1, 2, 3, 4, 1]
    assert IncreLoraConfig(target_r=8, incre_rank_num=2).step_ranks == 2


def test_no_growth_possible_means_no_live_reserve(make_llama):
    model = make_llama()
    paretune.adapt(model, "increlora", targets=TARGETS, init_r=2, target_r=2)
    for d in _ours(model).values():
        assert not d.reserved and d.bank.done


# -- training --------------------------------------------------------------------------------

def _tiny_bert():
    """The 16-wide 1-layer BERT classifier over the MiniLM vocabulary."""
    return tiny.build_bert(vocab=tiny.minilm_tokenizer().vocab_size)


# 3 matrices from rank 1 to a budget of 3 × 3 = 9: two ranks per round (top_h 2) at steps 4, 6, 8
# (after init_warmup 2, every 2 steps), 3 → 5 → 7 → 9, then no more
KW = dict(method="increlora", targets=["query", "value", "intermediate.dense"],
          options={"init_r": 1, "target_r": 3, "incre_rank_num": 1, "top_h": 2, "init_warmup": 2, "incre_interval": 2},
          steps=11, batch_size=8, lr=1e-2, progress=False, seed=1)


@pytest.fixture(scope="module")
def grown():
    from paretune.training import train

    totals, groups = [], []

    def watch(step, model, opt):
        totals.append(sum(ranks(model).values()))
        groups.append(len(opt.param_groups))

    res = train(_tiny_bert(), tiny.COLOURS, tokenizer=tiny.minilm_tokenizer(), on_step=watch, **KW)
    return res, totals, groups


def test_ranks_grow_at_the_scheduled_steps_and_stop_at_the_budget(grown):
    res, totals, groups = grown
    assert totals == [3, 3, 3, 5, 5, 7, 7, 9, 9, 9, 9]
    assert groups[3] == groups[0] + 1 and groups[-1] == groups[0] + 3  # grown tensors joined the optimizer
    deltas = list(_ours(res.model).values())
    assert all(d.bank.done for d in deltas)
    assert all(float(d.reserve_e.abs().sum()) == 0 for d in deltas if d.reserved)  # reserves retired
    assert len(res.aux_history) == 11 and all(a > 0 for a in res.aux_history)
    for d in deltas:  # every activated e trained away from its start
        for e in list(d.E)[1:]:
            assert (e.detach() - 1e-5).abs().max() > 1e-4


def test_checkpoint_mid_growth_resumes_to_the_same_adapter(grown, tmp_path):
    from paretune.training import train

    res, totals, _ = grown

    ck = tmp_path / "ck"
    with pytest.raises(tiny.Interrupted):  # checkpoint at step 5 (ranks 5), stopped at 7
        train(_tiny_bert(), tiny.COLOURS, tokenizer=tiny.minilm_tokenizer(), checkpoint_dir=str(ck),
              checkpoint_every=5, on_step=tiny.interrupt_at(7), **KW)
    resumed = train(_tiny_bert(), tiny.COLOURS, tokenizer=tiny.minilm_tokenizer(),
                    checkpoint_dir=str(ck), checkpoint_every=5, resume=True, **KW)
    assert ranks(resumed.model) == ranks(res.model)
    tiny.assert_same_adapter(res.model, resumed.model)


def test_save_load_and_peft_export_of_a_grown_adapter(grown, tmp_path):
    res, _, _ = grown
    model = res.model.eval()
    batch = tiny.minilm_tokenizer()(["red blue", "gold teal"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**batch).logits
    paretune.save(model, tmp_path / "adapter")
    plain = copy.deepcopy(model)  # the base with the classifier head training gave it, without the adapter
    paretune.unload(plain)
    fresh = copy.deepcopy(plain)
    paretune.load(fresh, tmp_path / "adapter")
    assert ranks(fresh) == ranks(model)
    for d, d2 in zip(_ours(model).values(), _ours(fresh).values()):
        assert d2.chunks() == d.chunks() and len(d2.E) == len(d.E)
        torch.testing.assert_close(d2.delta_weight(), d.delta_weight(), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, want, atol=1e-6, rtol=0)
    assert paretune.count(fresh)["trainable"] == paretune.count(model)["trainable"]

    from peft import PeftModel

    paretune.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, want, atol=1e-5, rtol=0)


def test_a_file_of_another_shape_is_refused(make_llama):
    from paretune.errors import AdapterFileError

    model = make_llama()
    paretune.adapt(model, "increlora", targets=TARGETS)
    d = next(iter(_ours(model).values()))
    state = d.stored_state()
    state["A.0"] = torch.zeros(1, d.d_in + 1)
    with pytest.raises(AdapterFileError, match="A.0"):
        d.check_stored(state)
    state = d.stored_state()
    del state["reserve_e"]
    with pytest.raises(AdapterFileError, match="reserve"):
        d.check_stored(state)
