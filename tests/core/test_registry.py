"""The registry refuses what would break the engine later, with errors that say the fix."""

import dataclasses

import pytest
import torch

from paretune.core import AdapterConfig, Delta, LowRankDelta, register, registry, unregister
from paretune.errors import ConfigError


@dataclasses.dataclass
class _Cfg(AdapterConfig):
    r: int = 2


class _Gate(Delta):
    """An input-dependent delta: no weight delta."""

    mergeable = False

    def forward(self, x, base_out):
        return base_out * torch.sigmoid(x.mean(-1, keepdim=True))

    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return 0


def test_a_mergeable_class_without_delta_weight_is_refused():
    class NoDense(Delta):
        def forward(self, x, base_out):
            return base_out

        @classmethod
        def trainable_formula(cls, d_out, d_in, config):
            return 0

    with pytest.raises(ConfigError, match="mergeable.*delta_weight"):
        register("probe-no-dense", config=_Cfg, summary="s", formula="0")(NoDense)
    assert "probe-no-dense" not in registry.all_methods()


def test_a_non_mergeable_class_and_a_low_rank_class_register_and_unregister():
    class Factors(LowRankDelta):
        def factors(self):
            return torch.zeros(2, self.d_in), torch.zeros(self.d_out, 2)

        @classmethod
        def trainable_formula(cls, d_out, d_in, config):
            return 0

    for name, cls in (("probe-gate", _Gate), ("probe-factors", Factors)):
        register(name, config=_Cfg, summary="s", formula="0")(cls)
        assert registry.get(name).delta_cls is cls
        unregister(name)
        with pytest.raises(ConfigError, match="unknown method"):
            registry.get(name)


def test_a_taken_name_and_an_unknown_kind_are_refused():
    with pytest.raises(ConfigError, match="registered twice"):
        register("lora", config=_Cfg, summary="s", formula="0")(_Gate)
    with pytest.raises(ConfigError, match="unknown host kinds"):
        register("probe-kinds", config=_Cfg, summary="s", formula="0", kinds=("lstm",))(_Gate)
    assert registry.get("lora").delta_cls.__name__ == "LoraDelta"


def test_default_targets_and_module_names_reach_the_delta(make_llama):
    seen = []

    class Named(_Gate):
        def __init__(self, geometry, config, *, bank=None, layer=0):
            super().__init__(geometry, config, bank=bank, layer=layer)
            seen.append(geometry.name)

    register("probe-named", config=_Cfg, summary="s", formula="0", default_targets=lambda model: ["v_proj"])(Named)
    try:
        import paretune
        from paretune.bench.budget import layer_shapes

        model = make_llama()
        paretune.adapt(model, "probe-named")
        assert paretune.adapters(model)["default"].targets == seen == [
            "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
        assert sum(layer_shapes(make_llama(), "probe-named").values()) == 2  # the budget sees the same layers
        paretune.adapt(model, "probe-named", name="other", targets=["q_proj"])  # given targets win
        assert paretune.adapters(model)["other"].targets[0].endswith("q_proj")
    finally:
        unregister("probe-named")
