"""paretune.compress.lottery: the bookkeeping of iterative magnitude pruning on a tiny MLP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paretune.compress.lottery import iterative_magnitude_pruning
from paretune.compress.pruning import masks
from paretune.errors import ConfigError, ParetuneError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


def make_train(steps: int = 4, log: list | None = None):
    def train(model, on_step):
        if log is not None:
            log.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(1, steps + 1):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
            on_step(s)
        return float((model(X).argmax(1) == Y).float().mean())
    return train


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_rounds_remaining_counts_and_rewind_to_init(scope):
    log = []
    res = iterative_magnitude_pruning(Tiny, make_train(log=log), rounds=3, prune_fraction_per_round=0.5,
                                      rewind="init", scope=scope, seed=7, progress=False)
    assert [r.round for r in res.rounds] == [0, 1, 2, 3]
    sizes = {"fc1": 60, "fc2": 30}
    expect = dict(sizes)
    for r in res.rounds[1:]:
        if scope == "layer":
            expect = {n: v - int(0.5 * v) for n, v in expect.items()}
            assert r.layers == expect
        else:
            total = sum(expect.values()) if r.round == 1 else res.rounds[r.round - 1].remaining_weights
            assert r.remaining_weights == total - int(0.5 * total)
    assert res.rounds[0].remaining_weights == 90 and res.rounds[0].fraction_remaining == 1.0
    assert all(0 <= r.accuracy <= 1 for r in res.rounds)
    # every round started from θ0 (masked): the weights the train function saw
    theta0 = log[0]
    mk = masks(res.model)
    for start in log[1:]:
        for n in ("fc1", "fc2"):
            w = start[f"{n}.weight"]
            assert torch.equal(w[w != 0], theta0[f"{n}.weight"][w != 0])
        assert torch.equal(start["fc1.bias"], theta0["fc1.bias"])  # biases rewound, never pruned
    for n, m in mk.items():  # pruned weights stay zero after training
        assert (res.model.get_submodule(n).weight[~m] == 0).all()
    assert sum(int(m.sum()) for m in mk.values()) == res.rounds[-1].remaining_weights


def test_rewind_none_continues_and_reinit_redraws():
    log = []
    res = iterative_magnitude_pruning(Tiny, make_train(log=log), rounds=1, prune_fraction_per_round=0.3,
                                      rewind="none", progress=False)
    trained = res.rounds  # round 1 starts from round 0's trained weights, masked
    assert not torch.equal(log[1]["fc2.bias"], log[0]["fc2.bias"])
    log2 = []
    iterative_magnitude_pruning(Tiny, make_train(log=log2), rounds=1, prune_fraction_per_round=0.3,
                                rewind="reinit", progress=False)
    assert not torch.equal(log2[1]["fc1.bias"], log2[0]["fc1.bias"])  # a new draw, not θ0
    assert trained[1].layers == {"fc1": 60 - 18, "fc2": 30 - 9}


def test_rewind_to_step_k():
    log = []
    snap = {}

    def train(model, on_step):
        log.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(1, 5):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
            on_step(s)
            if len(log) == 1 and s == 2:
                snap.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return 0.5

    iterative_magnitude_pruning(Tiny, train, rounds=1, rewind=2, progress=False)
    assert torch.equal(log[1]["fc1.bias"], snap["fc1.bias"])
    w = log[1]["fc1.weight"]
    assert torch.equal(w[w != 0], snap["fc1.weight"][w != 0])
    with pytest.raises(ParetuneError, match="step 9"):
        iterative_magnitude_pruning(Tiny, make_train(steps=3), rounds=1, rewind=9, progress=False)


@pytest.mark.parametrize("kw", [{"rounds": -1}, {"prune_fraction_per_round": 1.0}, {"rewind": "late"},
                                {"scope": "row"}, {"rewind": True}])
def test_bad_options(kw):
    args = {"rounds": 1, "prune_fraction_per_round": 0.2, **kw}
    with pytest.raises(ConfigError):
        iterative_magnitude_pruning(Tiny, make_train(), args.pop("rounds"), args.pop("prune_fraction_per_round"),
                                    progress=False, **args)
