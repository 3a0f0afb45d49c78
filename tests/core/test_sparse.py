"""SparseDelta: a fixed support of W's entries, values trained and saved with int32 indices;
merge and unmerge write only those entries."""

import dataclasses

import pytest
import torch
from torch import nn

import paretune
from paretune.core import AdapterConfig, SparseDelta, register, unregister
from paretune.core.host import Host
from paretune.errors import ConfigError


@dataclasses.dataclass
class _EveryThird(AdapterConfig):
    offset: int = 0


class _EveryThirdDelta(SparseDelta):
    """Positions offset, offset + 3, ... of the flat (d_out, d_in) matrix."""

    def __init__(self, geometry, config, *, bank=None, layer=0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.set_support(torch.arange(config.offset, self.d_out * self.d_in, 3))

    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return len(range(config.offset, d_out * d_in, 3))


@pytest.fixture
def every_third():
    register("probe-every-third", config=_EveryThird, summary="s", formula="⌈d_out·d_in/3⌉")(_EveryThirdDelta)
    yield "probe-every-third"
    unregister("probe-every-third")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).eval()


def _randomise(model):
    with torch.no_grad():
        for h in model.modules():
            if isinstance(h, Host):
                for d in h.deltas.values():
                    d.values.normal_()


def test_delta_is_values_at_the_support_and_merge_writes_only_there(every_third, tmp_path):
    model = _model()
    x = torch.randn(3, 6)
    base_out = model(x)
    paretune.adapt(model, every_third)
    torch.testing.assert_close(model(x), base_out)  # zero start
    _randomise(model)
    hosts = [h for h in model.modules() if isinstance(h, Host)]
    for h in hosts:
        d = h.deltas["default"]
        dw = d.delta_weight()
        flat = torch.zeros(d.d_out * d.d_in)
        flat[torch.arange(0, d.d_out * d.d_in, 3)] = d.values.detach()
        torch.testing.assert_close(dw.detach(), flat.view(d.d_out, d.d_in))
        assert d.indices.dtype == torch.int32
    out = model(x)
    before = [h.base.weight.detach().clone() for h in hosts]
    paretune.merge(model)
    for h, w0 in zip(hosts, before):
        changed = (h.base.weight != w0).flatten().nonzero().flatten()
        assert set(changed.tolist()) <= set(range(0, w0.numel(), 3))
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)
    paretune.unmerge(model)
    for h, w0 in zip(hosts, before):
        torch.testing.assert_close(h.base.weight, w0, atol=1e-6, rtol=0)
    paretune.save(model, tmp_path / "a")
    count = paretune.count(model)
    assert count["stored_bytes"] == sum(d.values.numel() * (4 + 4) for h in hosts for d in h.deltas.values())
    fresh = paretune.load(_model(), tmp_path / "a")
    torch.testing.assert_close(fresh(x), out)


def test_bad_supports_are_clear_errors(every_third):
    model = _model()
    d = _EveryThirdDelta(Host(model[0], paretune.core.state.ModelState()).geometry, _EveryThird())
    with pytest.raises(ConfigError, match="twice"):
        d.set_support(torch.tensor([1, 1]))
    with pytest.raises(ConfigError, match=r"\[0, 30\)"):
        d.set_support(torch.tensor([30]))
    with pytest.raises(ConfigError, match="no entry"):
        d.set_support(torch.tensor([], dtype=torch.long))
