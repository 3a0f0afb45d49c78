"""Hosts around whole sub-layers (kind "block") and normalisation layers (kind "norm").

Plug-in methods registered for these tests only: a block adapter that adds a linear map of the
block's input to its output, and a norm delta that changes γ (merged like any ΔW)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import paretune
from paretune.core import AdapterConfig, Delta, register, unregister
from paretune.core.geometry import BlockGeometry, NormGeometry, geometry_for
from paretune.core.host import BlockHost, Host
from paretune.errors import TargetError


@dataclasses.dataclass
class _Cfg(AdapterConfig):
    pass


class _BlockBypass(Delta):
    """out = block(x) + M x, M (d, d) zero at the start."""

    mergeable = False

    def __init__(self, geometry, config, *, bank=None, layer=0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.m = nn.Parameter(torch.zeros(self.d_out, self.d_in))

    def forward(self, x, base_out):
        return base_out + x @ self.m.T

    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return d_out * d_in


class _NormScale(Delta):
    """γ -> γ + Δγ (and β -> β + Δβ where the base has β)."""

    def __init__(self, geometry, config, *, bank=None, layer=0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.dg = nn.Parameter(torch.zeros(self.d_out, 1))
        self.db = nn.Parameter(torch.zeros(self.d_out)) if geometry.bias is not None else None

    def forward(self, x, base_out):
        out = base_out + self.geometry.normalized(x) * self.dg.view(-1)
        return out + self.db if self.db is not None else out

    def delta_weight(self):
        return self.dg

    def delta_bias(self):
        return self.db

    @classmethod
    def trainable_formula(cls, d_out, d_in, config):
        return 2 * d_out


@pytest.fixture(scope="module", autouse=True)
def plugins():
    register("probe-block", config=_Cfg, summary="s", formula="d²", kinds=("block",))(_BlockBypass)
    register("probe-norm", config=_Cfg, summary="s", formula="2d", kinds=("norm",))(_NormScale)
    yield
    unregister("probe-block")
    unregister("probe-norm")


def test_geometries_of_norms_and_blocks(make_llama, make_bert):
    llama, bert = make_llama(), make_bert()
    assert isinstance(geometry_for(llama.model.layers[0].input_layernorm), NormGeometry)
    assert isinstance(geometry_for(bert.bert.encoder.layer[0].output.LayerNorm), NormGeometry)
    mlp = geometry_for(llama.model.layers[0].mlp)
    assert isinstance(mlp, BlockGeometry) and (mlp.d_in, mlp.d_out) == (16, 16)
    assert geometry_for(llama.model.layers) is None  # a ModuleList has no forward of its own
    assert geometry_for(nn.LayerNorm(4, elementwise_affine=False)) is None


def test_normalized_is_the_norm_before_its_scale(make_llama, make_bert):
    x = torch.randn(2, 3, 16)
    for norm in (make_llama().model.layers[0].input_layernorm, make_bert().bert.encoder.layer[0].output.LayerNorm):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        g = geometry_for(norm)
        shift = norm.bias if getattr(norm, "bias", None) is not None else 0
        torch.testing.assert_close(g.normalized(x) * norm.weight + shift, norm(x))


@pytest.mark.parametrize("attention", [False, True])
def test_a_block_host_wraps_a_llama_sub_layer(make_llama, ids, attention):
    base, model = make_llama(), make_llama()
    target = "self_attn" if attention else "mlp"  # attention: keyword hidden_states, tuple output
    paretune.adapt(model, "probe-block", targets=[target])
    hosts = [m for m in model.modules() if isinstance(m, BlockHost)]
    assert len(hosts) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)  # zero start
        for h in hosts:
            h.deltas["default"].m.normal_(0, 0.1)
        changed = model(ids).logits
    assert not torch.allclose(changed, base(ids).logits)
    with pytest.raises(paretune.errors.ParetuneError, match="cannot be merged|input-dependent"):
        paretune.merge(model)
    paretune.unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
    assert not any(isinstance(m, Host) for m in model.modules())


def test_linear_hosts_inside_a_block_host_are_found_and_counted(make_llama, ids, perturb):
    model = make_llama()
    paretune.adapt(model, "probe-block", name="blk", targets=["mlp"])
    paretune.adapt(model, "lora", name="lo", targets=["down_proj", "q_proj"], r=2)
    assert isinstance(model.model.layers[0].mlp, BlockHost)
    assert isinstance(model.model.layers[0].mlp.base.down_proj, Host)
    names = paretune.adapters(model)["lo"].targets
    assert "model.layers.0.mlp.down_proj" in names and len(names) == 4
    assert paretune.count(model, "lo")["trainable"] == 2 * 2 * (16 + 16) + 2 * 2 * (32 + 16)
    perturb(model)
    with torch.no_grad():
        before = model(ids).logits
        paretune.merge(model, "lo")
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_a_norm_delta_merges_into_gamma_and_beta(make_bert, make_llama, ids):
    for make in (make_bert, make_llama):
        base, model = make(), make()
        paretune.adapt(model, "probe-norm", targets=".*norm.*|.*LayerNorm")
        n = len(paretune.adapters(model)["default"].targets)
        assert n >= 2
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base(ids).logits)
            for _, h in paretune.core.inject.hosts(model):
                d = h.deltas["default"]
                d.dg.normal_(0, 0.2)
                if d.db is not None:
                    d.db.normal_(0, 0.2)
            unmerged = model(ids).logits
            paretune.merge(model)
            torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
            paretune.unmerge(model)
            torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        if make is make_llama:  # RMSNorm: no β, and merging never gives it one
            assert all(h.deltas["default"].db is None for _, h in paretune.core.inject.hosts(model))


def test_matrix_methods_do_not_take_norms_or_blocks(make_llama):
    with pytest.raises(TargetError, match="cannot adapt"):
        paretune.adapt(make_llama(), "lora", targets=["mlp"])
    with pytest.raises(TargetError, match="cannot adapt"):
        paretune.adapt(make_llama(), "lora", targets=["input_layernorm"])
