"""AdaLoRA: ΔW, outputs, orthogonality loss and rank allocation against PEFT's AdaLoRA (copied
tensors, copied gradients), the count, the training schedule and bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paretune
from paretune.core.inject import hosts
from paretune.errors import ConfigError
from paretune.methods.adalora import AdaLoraDelta, budget_schedule, effective_ranks

import tiny_transformers as tiny
from layer_chain import left_unchanged

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


def _peft(model: nn.Module, **kw):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(target_modules=TARGETS, lora_dropout=0.0, **kw)
    return get_peft_model(model, cfg)


def _peft_layers(peft_model) -> dict[str, nn.Module]:
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in peft_model.named_modules() if hasattr(m, "lora_E")}


def _ours(model: nn.Module) -> dict[str, AdaLoraDelta]:
    return {n: h.deltas["default"] for n, h in hosts(model)}


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for d in _ours(model).values():
        for p in (d.A, d.E, d.B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@torch.no_grad()
def _copy_to_peft(model: nn.Module, peft_model) -> None:
    layers = _peft_layers(peft_model)
    assert set(layers) == set(_ours(model))
    for name, d in _ours(model).items():
        lay = layers[name]
        lay.lora_A["default"].copy_(d.A)
        lay.lora_E["default"].copy_(d.E)
        lay.lora_B["default"].copy_(d.B)


def _pair(make_llama, **kw):
    base = make_llama()
    ours = make_llama()
    paretune.adapt(ours, "adalora", targets=TARGETS, init_r=kw["init_r"], target_r=kw["target_r"],
                   alpha=kw["lora_alpha"], tinit=kw.get("tinit", 0), tfinal=kw.get("tfinal", 0),
                   deltaT=kw.get("deltaT", 1), orth_reg_weight=kw.get("orth_reg_weight", 0.5),
                   total_step=kw["total_step"])
    peft_model = _peft(copy.deepcopy(base), **kw)
    return ours, peft_model


def test_delta_weight_and_outputs_equal_pefts(make_llama, llama_batch):
    ours, peft_model = _pair(make_llama, init_r=4, target_r=2, lora_alpha=8, total_step=10)
    _randomise(ours)
    _copy_to_peft(ours, peft_model)
    layers = _peft_layers(peft_model)
    for name, d in _ours(ours).items():
        expected = layers[name].get_delta_weight("default")
        torch.testing.assert_close(d.delta_weight(), expected, atol=1e-7, rtol=1e-6)
        # and the formula, written out: α/(r + 1e-5) · B diag(E) A
        by_hand = 8 / (4 + 1e-5) * d.B @ torch.diag(d.E.view(-1)) @ d.A
        torch.testing.assert_close(d.delta_weight(), by_hand, atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(llama_batch).logits, peft_model(llama_batch).logits, atol=ATOL, rtol=0)


def test_starts_at_the_base(make_llama, llama_batch):
    base = make_llama()
    ours = make_llama()
    paretune.adapt(ours, "adalora", targets=TARGETS, init_r=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(llama_batch).logits, base(llama_batch).logits, atol=0, rtol=0)
    for d in _ours(ours).values():
        assert d.A.std().item() == pytest.approx(0.02, rel=0.5) and d.E.abs().sum() == 0


def test_orth_loss_equals_pefts_and_the_formula(make_llama, llama_batch):
    ours, peft_model = _pair(make_llama, init_r=4, target_r=2, lora_alpha=8, total_step=10, orth_reg_weight=0.7)
    _randomise(ours)
    _copy_to_peft(ours, peft_model)
    ours.train()
    peft_model.train()
    out = ours(llama_batch, labels=llama_batch)
    aux = sum(a for a in (d.aux_loss() for d in _ours(ours).values()) if a is not None)
    peft_out = peft_model.base_model(input_ids=llama_batch, labels=llama_batch)  # AdaLoraModel.forward adds it
    torch.testing.assert_close(peft_out.loss - out.loss, aux, atol=1e-5, rtol=1e-5)
    # independently: weight · mean over the 2L matrices of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F
    terms = []
    for d in _ours(ours).values():
        a, b = d.A.detach(), d.B.detach()
        terms.append(torch.sqrt(((a @ a.T - torch.eye(4)) ** 2).sum()))
        terms.append(torch.sqrt(((b.T @ b - torch.eye(4)) ** 2).sum()))
    torch.testing.assert_close(aux.detach(), 0.7 * sum(terms) / len(terms), atol=1e-6, rtol=1e-6)
    # read once: a second call has nothing
    assert all(d.aux_loss() is None for d in _ours(ours).values())
    # no auxiliary loss outside training
    ours.eval()
    with torch.no_grad():
        ours(llama_batch)
    assert all(d.aux_loss() is None for d in _ours(ours).values())


def test_paper_orth_form_is_the_squared_sum(make_llama, llama_batch):
    model = make_llama()
    paretune.adapt(model, "adalora", targets=TARGETS, init_r=3, orth="paper", orth_reg_weight=0.2)
    _randomise(model)
    model.train()
    model(llama_batch)
    aux = sum(d.aux_loss() for d in _ours(model).values())
    want = 0
    for d in _ours(model).values():
        a, b = d.A.detach(), d.B.detach()
        want += ((a @ a.T - torch.eye(3)) ** 2).sum() + ((b.T @ b - torch.eye(3)) ** 2).sum()
    torch.testing.assert_close(aux.detach(), 0.2 * want, atol=1e-5, rtol=1e-6)


def test_rank_allocator_masks_the_triplets_pefts_does(make_llama, llama_batch):
    """The same gradients on the same numbers, step by step through warm-up, the cubic fall and the
    final phase: PEFT's RankAllocator and ours zero the same e_i."""
    T = 10
    kw = dict(init_r=4, target_r=2, lora_alpha=8, total_step=T, tinit=2, tfinal=3, deltaT=2)
    ours, peft_model = _pair(make_llama, **kw)
    _randomise(ours)
    _copy_to_peft(ours, peft_model)
    layers = _peft_layers(peft_model)
    deltas = _ours(ours)
    g = torch.Generator().manual_seed(11)
    masked_any = False
    for step in range(1, T + 3):
        ours.zero_grad()
        ids = torch.randint(0, 64, (2, 6), generator=g)
        ours(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for name, d in deltas.items():
                for mine, theirs in ((d.A, layers[name].lora_A["default"]), (d.E, layers[name].lora_E["default"]),
                                     (d.B, layers[name].lora_B["default"])):
                    theirs.grad = mine.grad.clone()
                    mine.sub_(0.05 * mine.grad)  # the same plain SGD step on both
                    theirs.sub_(0.05 * theirs.grad)
        for d in deltas.values():  # the trainer calls every delta; the first does the allocation
            d.on_step(step, T)
        peft_model.base_model.update_and_allocate(step)
        for name, d in deltas.items():
            theirs = layers[name].lora_E["default"]
            assert torch.equal((d.E == 0), (theirs == 0)), (step, name)
            torch.testing.assert_close(d.E, theirs, atol=0, rtol=0)
            masked_any |= bool((d.E == 0).any())
    assert masked_any
    # at the end the budget is target_r per matrix on average
    assert sum(effective_ranks(ours).values()) == 2 * len(deltas)


def test_budget_schedule_is_cubic():
    from paretune.methods.adalora import AdaLoraConfig

    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=10, tfinal=20, deltaT=5)
    T, b0, b1 = 100, 60, 20
    assert budget_schedule(10, T, b0, b1, cfg) == (60, False)
    assert budget_schedule(81, T, b0, b1, cfg) == (20, True)
    for t in (11, 15, 45, 80):
        want = int((b0 - b1) * (1 - (t - 10) / (100 - 20 - 10)) ** 3 + b1)
        assert budget_schedule(t, T, b0, b1, cfg) == (want, t % 5 == 0)


def test_count_is_the_papers_and_pefts(make_llama):
    model = make_llama()
    paretune.adapt(model, "adalora", targets=TARGETS, init_r=5)
    peft_model = _peft(make_llama(), init_r=5, target_r=2, lora_alpha=8, total_step=10)
    want = sum(5 * (d.d_in + d.d_out + 1) for d in _ours(model).values())
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == want
    assert want == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert set(effective_ranks(model).values()) == {5}


@pytest.mark.parametrize("options, option", [
    ({"init_r": 4, "target_r": 6}, "target_r"),
    ({"init_r": 0}, "init_r"),
    ({"deltaT": 0}, "deltaT"),
    ({"beta1": 1.0}, "beta1"),
    ({"orth_reg_weight": -1.0}, "orth_reg_weight"),
    ({"orth": "other"}, "orth"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, "tinit"),
])
def test_bad_options_are_config_errors_and_leave_the_model(make_llama, options, option):
    model = make_llama()
    with left_unchanged(model), pytest.raises(ConfigError, match=option):
        paretune.adapt(model, "adalora", targets=TARGETS, **options)


def test_target_r_defaults_to_two_thirds_of_init_r():
    from paretune.methods.adalora import AdaLoraConfig

    assert AdaLoraConfig().target_r == 8 and AdaLoraConfig(init_r=3).target_r == 2
    assert AdaLoraConfig(init_r=1).target_r == 1


def test_unknown_architecture_needs_targets():
    from paretune.errors import TargetError

    with pytest.raises(TargetError, match="targets="):
        paretune.adapt(nn.Sequential(nn.Linear(4, 4)), "adalora")


def test_growth_state_round_trip_continues_the_same_allocation(make_llama):
    """What a checkpoint keeps (averages, mask, last step) lets a fresh adapter allocate as the first."""
    T = 8
    models = []
    for _ in range(2):
        m = make_llama()
        paretune.adapt(m, "adalora", targets=TARGETS, init_r=4, target_r=2, total_step=T, tinit=1, tfinal=2)
        _randomise(m)
        models.append(m)
    first, second = models
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (2, 6), generator=g) for _ in range(T)]

    def step(model, t):
        model.zero_grad()
        model(batches[t - 1], labels=batches[t - 1]).loss.backward()
        for d in _ours(model).values():
            d.on_step(t, T)

    for t in range(1, 5):
        step(first, t)
    with torch.no_grad():  # the checkpoint: trained values and growth state
        for (n, d), (_, d2) in zip(_ours(first).items(), _ours(second).items()):
            for name in ("A", "E", "B"):
                getattr(d2, name).copy_(getattr(d, name))
            d2.grow_to(d.growth_state())
    for d in _ours(second).values():
        d.on_step(4, T)  # the trainer's call on resume: nothing happens
    for t in range(5, T + 1):
        step(first, t)
        step(second, t)
    for d, d2 in zip(_ours(first).values(), _ours(second).values()):
        assert torch.equal(d.mask, d2.mask) and torch.equal(d.E, d2.E)
    assert sum(effective_ranks(second).values()) == 2 * len(_ours(second))


# -- training --------------------------------------------------------------------------------

def _tiny_bert():
    """The 16-wide 1-layer BERT classifier over the MiniLM vocabulary."""
    return tiny.build_bert(vocab=tiny.minilm_tokenizer().vocab_size)


@pytest.mark.slow
def test_training_masks_down_to_the_budget_and_resumes_identically(tmp_path):
    from paretune.training import train

    seen = []
    kw = dict(tokenizer=tiny.minilm_tokenizer(), method="adalora", targets=["query", "value", "intermediate.dense"],
              options={"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}, steps=8, batch_size=8, lr=1e-2,
              progress=False, seed=3)
    full = train(_tiny_bert(), tiny.COLOURS,
                 on_step=lambda s, m, o: seen.append(sum(effective_ranks(m).values())), **kw)
    assert seen[0] == 12 and seen[-1] == 6 and seen == sorted(seen, reverse=True)  # 3 matrices: 4 → 2 each
    assert len(full.aux_history) == 8 and all(a > 0 for a in full.aux_history)
    for d in _ours(full.model).values():
        assert int((d.E != 0).sum()) == d.effective_rank()

    ck = tmp_path / "ck"
    with pytest.raises(tiny.Interrupted):
        train(_tiny_bert(), tiny.COLOURS, checkpoint_dir=str(ck), checkpoint_every=4,
              on_step=tiny.interrupt_at(5), **kw)
    resumed = train(_tiny_bert(), tiny.COLOURS, checkpoint_dir=str(ck), checkpoint_every=4,
                    resume=True, **kw)
    tiny.assert_same_adapter(full.model, resumed.model)
