"""paretune.configs: JSON-serialisable method configs accepted by paretune.adapt."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import paretune
from paretune.api import adapt, print_trainable_parameters
from paretune.configs import LoraConfig, MethodConfig, PissaConfig, VeraConfig, config_class
from paretune.core.registry import all_methods
from paretune.errors import ConfigError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_round_trip_through_json_for_every_registered_method():
    required = {"scalearn": {"sources": ["a", "b"]}}  # options without a usable default
    for method, spec in all_methods().items():
        cfg = MethodConfig(method, **required.get(method, {}))
        text = cfg.to_json()
        back = MethodConfig.from_json(text)
        assert back == cfg and back.method == method
        assert json.loads(text)["method"] == method
        assert set(cfg.options) <= set(spec.config_cls.options())  # what the method saves in its files


def test_named_config_fills_defaults_and_keeps_targets():
    cfg = LoraConfig(r=4, alpha=8, targets=("0",))
    d = cfg.to_dict()
    assert d == {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": False, "init": "kaiming",
                 "targets": ["0"]}
    back = MethodConfig.from_dict(d)
    assert type(back) is LoraConfig and back == cfg
    assert LoraConfig.from_dict({"r": 2}).options["r"] == 2
    assert config_class("vera") is VeraConfig and config_class("nola") is MethodConfig


def test_bad_options_fail_when_the_config_is_built():
    with pytest.raises(ConfigError, match="unknown option 'rank'"):
        LoraConfig(rank=8)
    with pytest.raises(ConfigError, match="r"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="for method 'lora'"):
        LoraConfig("vera")
    with pytest.raises(paretune.ParetuneError):
        MethodConfig("no-such-method")
    with pytest.raises(ConfigError, match="no 'method'"):
        MethodConfig.from_dict({"r": 2})
    with pytest.raises(ConfigError, match="not valid JSON"):
        MethodConfig.from_json("{")


def test_adapt_with_a_config_equals_adapt_with_keywords():
    a, b = _mlp(), _mlp()
    adapt(a, LoraConfig(r=2, alpha=4, targets=["0", "2"]))
    adapt(b, "lora", r=2, alpha=4, targets=["0", "2"])
    assert paretune.adapters(a)["default"].config == paretune.adapters(b)["default"].config
    assert paretune.count(a) == paretune.count(b)
    c = _mlp()
    adapt(c, PissaConfig(r=2, targets=["0"]), targets=["2"], r=3)  # keywords given here win
    info = paretune.adapters(c)["default"]
    assert info.targets == ["2"] and info.config.r == 3
    with pytest.raises(ConfigError, match="method must be"):
        adapt(_mlp(), 42)  # type: ignore[arg-type]


def test_print_trainable_parameters_matches_peft_format(capsys):
    m = _mlp()
    adapt(m, "lora", r=2, targets=["0"])
    m[2].bias.requires_grad_(True)  # a trained head parameter counts as trainable, as in PEFT
    print_trainable_parameters(m)
    base = 8 * 16 + 16 + 16 * 4 + 4
    lora = 2 * 8 + 16 * 2
    trainable, total = lora + 4, base + lora
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    plain = _mlp()
    for p in plain.parameters():
        p.requires_grad_(False)
    print_trainable_parameters(plain)
    assert capsys.readouterr().out == f"trainable params: 0 || all params: {base:,d} || trainable%: 0.0000\n"
