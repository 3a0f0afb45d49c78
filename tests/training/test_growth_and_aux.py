"""The trainer's general mechanisms for routed and growing methods: auxiliary losses added to the
task loss, parameters created by a schedule joining the optimizer, and checkpoints taken mid-growth
that resume to the same result."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import paretune

from paretune.core import AdapterConfig, Delta, register, unregister
from paretune.training import train

TOY = "toy-growing"


@dataclasses.dataclass
class GrowConfig(AdapterConfig):
    aux_weight: float = 0.01
    grow_every: int = 2
    max_rank: int = 3


class GrowDelta(Delta):
    """ΔW = Σ_i b_i a_iᵀ with one rank-1 pair at the start and one more every ``grow_every`` steps
    (b zero, a seeded), and an auxiliary loss aux_weight·Σ‖a_i‖²."""

    mergeable = False

    def __init__(self, geometry, config, *, bank=None, layer=0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        self.last = 0
        self._aux = None
        self._add()

    def _add(self) -> None:
        g = torch.Generator().manual_seed(len(self.a))
        self.a.append(nn.Parameter(torch.randn(1, self.geometry.d_in, generator=g) * 0.1))
        self.b.append(nn.Parameter(torch.zeros(self.geometry.d_out, 1)))

    def forward(self, x, base_out):
        a = torch.cat(list(self.a))
        b = torch.cat(list(self.b), dim=1)
        if self.training and torch.is_grad_enabled():
            self._aux = self.config.aux_weight * a.pow(2).sum()
        return base_out + (x @ a.T) @ b.T

    def aux_loss(self):
        aux, self._aux = self._aux, None
        return aux

    def on_step(self, step, total):
        if step > self.last and step % self.config.grow_every == 0 and len(self.a) < self.config.max_rank:
            self._add()
        self.last = max(self.last, step)

    def growth_state(self):
        return {"ranks": len(self.a), "last": self.last}

    def grow_to(self, state):
        while len(self.a) < state["ranks"]:
            self._add()
        self.last = state["last"]

    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return d_out + d_in

    def formula_now(self):
        return len(self.a) * (self.geometry.d_out + self.geometry.d_in)

    @classmethod
    def most_trainable(cls, geometries, config):
        return sum(config.max_rank * (g.d_out + g.d_in) for g in geometries)


@pytest.fixture
def toy_method():
    register(TOY, config=GrowConfig, summary="test-only growing rank", formula="d_out + d_in")(GrowDelta)
    yield TOY
    unregister(TOY)


def _deltas(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if ".deltas." in n}


def test_aux_loss_is_added_and_logged(toy_method, tiny_bert, minilm_tokenizer, colour_data):
    kw = dict(tokenizer=minilm_tokenizer, method=toy_method, targets=["query"], steps=3, batch_size=8,
              lr=1e-2, progress=False)
    res = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, options={"aux_weight": 1.0}, **kw)
    assert len(res.aux_history) == 3 and all(a > 0 for a in res.aux_history)
    assert res.metrics["aux_loss"] == pytest.approx(sum(res.aux_history) / 3)
    # the auxiliary loss reaches the gradients: a large weight shrinks a faster than none
    none = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, options={"aux_weight": 0.0}, **kw)
    big = {n: p for n, p in _deltas(res).items() if ".a." in n}
    small = {n: p for n, p in _deltas(none).items() if ".a." in n}
    assert sum(p.norm() for p in big.values()) < sum(p.norm() for p in small.values())


def test_grown_parameters_join_the_optimizer(toy_method, tiny_bert, minilm_tokenizer, colour_data):
    groups = []
    res = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method=toy_method,
                targets=["query"], steps=5, batch_size=8, lr=1e-2, progress=False,
                on_step=lambda step, model, opt: groups.append(len(opt.param_groups)))
    base_groups = groups[0]  # step 1 adds nothing; steps 2 and 4 add one group each
    assert groups == [base_groups, base_groups + 1, base_groups + 1, base_groups + 2, base_groups + 2]
    got = _deltas(res)
    assert any(n.endswith("b.1") for n in got) and any(n.endswith("b.2") for n in got)
    assert all(got[n].abs().sum() > 0 for n in got if n.endswith("b.1"))  # the grown rank trained
    # count: as it stands, and the budget (one 16 x 16 query layer; 3 ranks at most)
    cost = paretune.count(res.model)
    assert cost["trainable"] == cost["formula"] == cost["max_trainable"] == 3 * (16 + 16)
    fresh = paretune.adapt(tiny_bert(minilm_tokenizer.vocab_size), toy_method, targets=["query"])
    cost = paretune.count(fresh)
    assert cost["trainable"] == cost["formula"] == 16 + 16 and cost["max_trainable"] == 3 * (16 + 16)


def test_checkpoint_mid_growth_resumes_to_the_same_adapter(toy_method, tiny_bert, minilm_tokenizer,
                                                           colour_data, tmp_path, interrupt_at, interrupted):
    kw = dict(tokenizer=minilm_tokenizer, method=toy_method, targets=["query"], steps=6, batch_size=8,
              lr=1e-2, progress=False, seed=2)
    full = _deltas(train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, **kw))

    ck = tmp_path / "ck"
    with pytest.raises(interrupted):
        train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(ck), checkpoint_every=3,
              on_step=interrupt_at(4), **kw)
    resumed = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(ck),
                    checkpoint_every=3, resume=True, **kw)
    got = _deltas(resumed)
    assert set(got) == set(full)
    for n in full:
        torch.testing.assert_close(got[n], full[n], atol=1e-6, rtol=1e-5)
