"""FourierFT (Gao et al., ICML 2024): ΔW = scaling·Re(IDFT2(F)) with n seeded random frequencies.

Checked: counts (n per layer), PEFT's defaults and init, ΔW against an independent sum of Fourier
basis matrices, equality with PEFT's FourierFT (same frequencies for the same seed, same ΔW and
outputs on Linear and GPT-2 Conv1D layers), merge, save/load of the coefficients only,
gradients, and a too-large n refused with the model left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import paretune
from paretune.core import registry
from paretune.errors import ConfigError
from paretune.methods.fourierft import FourierFTConfig

from layer_chain import (CHAIN_SHAPES, SHAPES, TARGETS, assert_bad_options_refused, assert_merge_round_trip,
                         assert_only_these_get_gradients, assert_save_load_exact, assert_trainable_count,
                         assert_zero_delta_at_init, chain, deltas, left_unchanged, peft_pairs, randomise)
N = 40  # fits every layer of chain() (smallest: 8 x 12 = 96 entries)


def reference_delta(d_out: int, d_in: int, rows, cols, coeffs, scaling: float) -> torch.Tensor:
    """ΔW written out, in float64, without an FFT: the inverse 2-D DFT of a spectrum that is c_k at
    (j_k, l_k) and zero elsewhere is (1 / (d_out·d_in)) Σ_k c_k exp(2πi (j_k p / d_out + l_k q / d_in));
    its real part takes the cosine."""
    p = torch.arange(d_out, dtype=torch.float64)[:, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :]
    out = torch.zeros(d_out, d_in, dtype=torch.float64)
    for j, l, c in zip(rows.tolist(), cols.tolist(), coeffs.double().tolist()):
        out += c * torch.cos(2 * math.pi * (j * p / d_out + l * q / d_in))
    return scaling * out / (d_out * d_in)


# -- config, counts and init -------------------------------------------------------------------

def test_defaults_are_peft_s():
    from peft import FourierFTConfig as PeftFourierFTConfig

    ours, theirs = FourierFTConfig(), PeftFourierFTConfig()
    assert (ours.n_frequency, ours.scaling, ours.random_loc_seed, ours.init_weights) == (1000, 150.0, 777, False)
    assert (theirs.n_frequency, theirs.scaling, theirs.random_loc_seed, theirs.init_weights) == (1000, 150.0, 777, False)


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("n", [1, 5, 56])
def test_trainable_count_is_n(d_in, d_out, n):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "fourierft", n_frequency=n)
    cost = assert_trainable_count(model, n)
    assert cost["stored_bytes"] == 4 * n  # the float32 coefficients, nothing else


def test_count_and_stored_bytes_over_layers_of_several_shapes():
    model = chain()
    paretune.adapt(model, "fourierft", n_frequency=N, targets=TARGETS)
    cost = assert_trainable_count(model, 6 * N)
    assert cost["stored_bytes"] == 6 * N * 4
    assert registry.get("fourierft").formula == "n_frequency"


def test_full_spectrum_is_allowed():
    model = nn.Sequential(nn.Linear(5, 3))
    paretune.adapt(model, "fourierft", n_frequency=15)
    d = deltas(model)["0"]
    assert sorted(d.positions().tolist()) == list(range(15))


def test_default_init_is_standard_normal_and_init_weights_true_is_zero(make_llama, llama_batch):
    model = nn.Sequential(nn.Linear(64, 64))
    torch.manual_seed(0)
    paretune.adapt(model, "fourierft")
    c = deltas(model)["0"].spectrum
    assert c.shape == (1000,)
    assert abs(c.mean().item()) < 0.1 and abs(c.std().item() - 1.0) < 0.1  # N(0, 1), as PEFT
    assert deltas(model)["0"].delta_weight().abs().max() > 0

    assert_zero_delta_at_init(make_llama, llama_batch, "fourierft", "spectrum", n_frequency=64, init_weights=True)


# -- ΔW -------------------------------------------------------------------------------------------

def test_frequencies_are_a_seeded_randperm_of_the_spectrum():
    model = chain()
    paretune.adapt(model, "fourierft", n_frequency=N, targets=TARGETS, random_loc_seed=4321)
    for (d_out, d_in), d in zip(CHAIN_SHAPES, deltas(model).values()):
        expected = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(4321))[:N]
        assert torch.equal(d.positions().cpu(), expected)
        rows, cols = d.frequencies()
        assert torch.equal(rows * d_in + cols, expected) and int(rows.max()) < d_out and int(cols.max()) < d_in


def test_layers_of_one_shape_share_frequencies_and_seeds_change_them():
    m1, m2 = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12)), nn.Sequential(nn.Linear(12, 12))
    paretune.adapt(m1, "fourierft", n_frequency=30, random_loc_seed=1)
    paretune.adapt(m2, "fourierft", n_frequency=30, random_loc_seed=2)
    a, b = deltas(m1)["0"], deltas(m1)["1"]
    assert a.bank is b.bank and torch.equal(a.positions(), b.positions())
    assert not torch.equal(a.positions(), deltas(m2)["0"].positions())
    assert not any("bank" in k or "loc_" in k for k in m1.state_dict())  # never in a state dict


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_weight_is_the_sum_of_fourier_basis_matrices(dtype):
    model = chain().to(dtype)
    paretune.adapt(model, "fourierft", n_frequency=N, targets=TARGETS, scaling=37.5, random_loc_seed=9)
    randomise(model)
    for (d_out, d_in), d in zip(CHAIN_SHAPES, deltas(model).values()):
        dw = d.delta_weight()
        assert dw.dtype == dtype and dw.shape == (d_out, d_in)
        rows, cols = d.frequencies()
        ref = reference_delta(d_out, d_in, rows, cols, d.spectrum.detach(), 37.5)
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(dw.detach().double(), ref, atol=atol, rtol=0)


def test_full_spectrum_delta_is_the_reference_too():
    model = nn.Sequential(nn.Linear(6, 4))
    paretune.adapt(model, "fourierft", n_frequency=24, scaling=2.0)
    d = deltas(model)["0"]
    rows, cols = d.frequencies()
    ref = reference_delta(4, 6, rows, cols, d.spectrum.detach(), 2.0)
    torch.testing.assert_close(d.delta_weight().detach().double(), ref, atol=1e-6, rtol=0)


def test_output_is_base_plus_delta_times_input():
    model = chain()
    base = chain()
    paretune.adapt(model, "fourierft", n_frequency=N, targets=["2"])
    x = torch.randn(5, 8)
    with torch.no_grad():
        h = base[1](base[0](x))
        dw = deltas(model)["2"].delta_weight()
        torch.testing.assert_close(model[2](h), base[2](h) + h @ dw.T, atol=1e-6, rtol=0)


# -- merge, save / load, gradients -----------------------------------------------------------------

def test_merged_equals_unmerged():
    model = chain()
    paretune.adapt(model, "fourierft", n_frequency=N, targets=TARGETS, scaling=20.0)
    randomise(model)
    assert_merge_round_trip(model, torch.randn(4, 8), atol=1e-4, rtol=1e-5)


def test_save_load_stores_only_the_coefficients(tmp_path):
    model = chain()
    paretune.adapt(model, "fourierft", n_frequency=N, targets=TARGETS, random_loc_seed=11)
    randomise(model)
    x = torch.randn(4, 8)
    torch.manual_seed(999)  # the fresh adapter's own random start is overwritten by the file
    fresh = assert_save_load_exact(model, tmp_path / "a", x)
    for d, e in zip(deltas(model).values(), deltas(fresh).values()):
        assert torch.equal(d.positions(), e.positions()) and torch.equal(d.spectrum, e.spectrum)

    path = tmp_path / "a" / "adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 and f.get_tensor(k).shape == (N,) for k in keys)
    assert keys == {f"{t}.spectrum" for t in TARGETS}
    assert path.stat().st_size < 6 * N * 4 + 2048


def test_only_the_coefficients_get_gradients():
    model = chain()
    paretune.adapt(model, "fourierft", n_frequency=N, targets=TARGETS)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    assert_only_these_get_gradients(model, (".spectrum",), bank=False)


def test_gradient_is_the_basis_matrices_applied_to_the_output_gradient():
    """d(Σ G ⊙ ΔW)/dc_k = scaling/(d_out·d_in) Σ_pq G[p,q] cos(2π(j_k p/d_out + l_k q/d_in))."""
    model = nn.Sequential(nn.Linear(12, 8)).double()
    paretune.adapt(model, "fourierft", n_frequency=20, scaling=3.0)
    d = deltas(model)["0"]
    g = torch.randn(8, 12, dtype=torch.float64)
    (d.delta_weight() * g).sum().backward()
    rows, cols = d.frequencies()
    expected = torch.stack([(g * reference_delta(8, 12, rows[k:k + 1], cols[k:k + 1], torch.ones(1), 3.0)).sum()
                            for k in range(20)])
    torch.testing.assert_close(d.spectrum.grad, expected, atol=1e-12, rtol=0)


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"n_frequency": 0}, {"n_frequency": -3}, {"n_frequency": 2.5},
                                 {"n_frequency": True}, {"scaling": float("nan")}, {"scaling": "big"},
                                 {"random_loc_seed": -1}, {"random_loc_seed": None}, {"init_weights": 1},
                                 {"n_frequencies": 4}])
def test_bad_options_are_config_errors(bad):
    assert_bad_options_refused("fourierft", bad)


def test_n_above_a_layers_size_is_a_clear_error_and_leaves_the_model_unchanged():
    model = chain()  # n=100 fits every layer but the 12 x 8 one, chain()[2] (96 entries)
    with (left_unchanged(model, torch.randn(3, 8)),
          pytest.raises(ConfigError, match=r"n_frequency=100 is invalid for a \(12 x 8\) layer.*96 entries")):
        paretune.adapt(model, "fourierft", n_frequency=100, targets=TARGETS)
    with pytest.raises(ConfigError, match="n_frequency=100"):
        registry.get("fourierft").delta_cls.trainable_formula(12, 8, FourierFTConfig(n_frequency=100))
    # the same n on the layers it fits is fine
    paretune.adapt(model, "fourierft", n_frequency=100, targets=["0", "1", "3", "4", "5"])


# -- equality with PEFT --------------------------------------------------------------------------------

def _peft_pair(model_fn, targets, n, seed, scaling=150.0, x=None):
    from peft import FourierFTConfig as PeftFourierFTConfig
    from peft import get_peft_model

    ours, theirs = model_fn(), model_fn()
    paretune.adapt(ours, "fourierft", n_frequency=n, random_loc_seed=seed, scaling=scaling, targets=targets)
    peft_model = get_peft_model(theirs, PeftFourierFTConfig(n_frequency=n, random_loc_seed=seed, scaling=scaling,
                                                            target_modules=targets))

    def copy(d, layer, g):
        d.spectrum.copy_(torch.randn(n, generator=g))
        layer.fourierft_spectrum["default"].copy_(d.spectrum)

    return ours, peft_model, peft_pairs(ours, peft_model, targets, copy)


@pytest.mark.parametrize("seed", [777, 3])
def test_equals_peft_on_linear_layers(seed):
    ours, peft_model, pairs = _peft_pair(chain, TARGETS, n=N, seed=seed)
    for d, layer in pairs:
        rows, cols = d.frequencies()
        assert torch.equal(torch.stack([rows, cols]), layer.indices["default"])  # same frequencies, same order
        torch.testing.assert_close(d.delta_weight(), layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=0)


def test_equals_peft_on_a_llama(make_llama, llama_batch):
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    ours, peft_model, pairs = _peft_pair(make_llama, targets, n=200, seed=777, scaling=20.0)
    for d, layer in pairs:
        torch.testing.assert_close(d.delta_weight(), layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(llama_batch).logits, peft_model(llama_batch).logits, atol=1e-5, rtol=0)


class _GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.c_attn = Conv1D(24, 8)  # weight (in=8, out=24)
        self.c_proj = Conv1D(8, 24)
        with torch.no_grad():
            for m in (self.c_attn, self.c_proj):
                m.weight.normal_(0, 0.3)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


def test_equals_peft_on_gpt2_conv1d_layers():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it sets fan_in_fan_out for Conv1D
        ours, peft_model, pairs = _peft_pair(_GPT2Block, ["c_attn", "c_proj"], n=50, seed=777, scaling=30.0)
    for d, layer in pairs:
        assert (d.d_out, d.d_in) == (layer.out_features, layer.in_features)
        torch.testing.assert_close(d.delta_weight(), layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=0)


def test_same_global_seed_gives_peft_s_random_start():
    """Both draw the frequencies from their own generator and then torch.randn(n) per layer, in order."""
    from peft import FourierFTConfig as PeftFourierFTConfig
    from peft import get_peft_model

    ours, theirs = chain(), chain()
    torch.manual_seed(21)
    paretune.adapt(ours, "fourierft", n_frequency=N, targets=TARGETS)
    torch.manual_seed(21)
    peft_model = get_peft_model(theirs, PeftFourierFTConfig(n_frequency=N, target_modules=TARGETS))
    for t in TARGETS:
        assert torch.equal(ours.get_submodule(t).deltas["default"].spectrum,
                           peft_model.base_model.model.get_submodule(t).fourierft_spectrum["default"])
