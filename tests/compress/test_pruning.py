"""paretune.compress.pruning: exact sparsities, Wanda's scores against a direct computation, masks
that survive training and merging, and errors that leave the model untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paretune
from paretune.compress import pruning as P
from compress_models import char_tokenizer
from paretune.errors import ConfigError, ParetuneError


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 9), nn.ReLU(), nn.Linear(9, 5))


TARGETS = ["0", "2", "4"]


def weights(model):
    return {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}


def test_magnitude_per_layer_exact_and_largest_kept():
    m = mlp()
    before = weights(m)
    rep = P.prune(m, 0.6, "magnitude", targets=TARGETS, progress=False)
    for n, w in before.items():
        k = int(0.6 * w.numel())
        # independent: the k smallest |w| by a full sort
        order = torch.argsort(w.abs().reshape(-1), stable=True)
        expect = torch.ones(w.numel(), dtype=torch.bool)
        expect[order[:k]] = False
        mask = m.get_submodule(n).prune_mask
        assert torch.equal(mask.reshape(-1), expect)
        assert torch.equal(m.get_submodule(n).weight, w * expect.view_as(w))
        assert rep["layers"][n]["pruned"] == k
        assert rep["layers"][n]["sparsity"] == pytest.approx(k / w.numel())
    n_all = sum(w.numel() for w in before.values())
    assert rep["targeted_weights"] == n_all
    assert rep["pruned_weights"] == sum(int(0.6 * w.numel()) for w in before.values())
    params = sum(p.numel() for p in m.parameters())
    assert rep["model_params"] == params
    assert rep["params_remaining"] == params - rep["pruned_weights"]
    assert P.sparsity_report(m)["pruned_weights"] == rep["pruned_weights"]


def test_magnitude_global_one_threshold():
    m = mlp(1)
    before = weights(m)
    rep = P.prune(m, 0.7, "magnitude-global", targets=TARGETS, progress=False)
    n_all = sum(w.numel() for w in before.values())
    assert rep["pruned_weights"] == int(0.7 * n_all)
    kept = torch.cat([before[n].abs()[m.get_submodule(n).prune_mask] for n in TARGETS])
    gone = torch.cat([before[n].abs()[~m.get_submodule(n).prune_mask] for n in TARGETS])
    assert gone.max() <= kept.min()
    assert len({round(v["sparsity"], 6) for v in rep["layers"].values()}) > 1  # layers differ


def test_lowest_k_ties_exact():
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0])
    assert P.lowest_k(s, 2).tolist() == [False, True, True, False, False]
    assert P.lowest_k(s, 0).sum() == 0 and P.lowest_k(s, 5).all()


def test_wanda_scores_and_masks_match_direct_computation():
    torch.manual_seed(3)
    lin = nn.Linear(6, 4)
    m = nn.Sequential(lin)
    batches = [torch.randn(2, 3, 6) * torch.arange(1, 7), torch.randn(5, 6)]
    w = lin.weight.detach().clone()
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    direct = w.double().abs() * x.pow(2).sum(0).sqrt()[None, :]  # |W_ij| * ||X_j||_2
    sq = x.pow(2).sum(0)
    assert torch.allclose(P.wanda_scores(w, sq).double(), direct, rtol=1e-6)
    rep = P.prune(m, 0.5, "wanda", targets=["0"], calibration=batches, progress=False)
    mask = lin.prune_mask
    for i in range(4):  # per output row: the 3 lowest direct scores go
        low = set(torch.argsort(direct[i])[:3].tolist())
        assert set((~mask[i]).nonzero().squeeze(1).tolist()) == low
    assert rep["layers"]["0"]["pruned"] == 12


def test_wanda_on_gpt2_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    conv = Conv1D(5, 7)  # weight (in=7, out=5)
    m = nn.Sequential(conv)
    batches = [torch.randn(4, 7)]
    w = conv.weight.detach().T.clone()  # (out, in)
    direct = w.abs() * batches[0].pow(2).sum(0).sqrt()[None, :]
    P.prune(m, 0.4, "wanda", targets=["0"], calibration=batches, progress=False)
    mask = conv.prune_mask.T  # stored in the weight's own (in, out) layout
    for i in range(5):
        assert set((~mask[i]).nonzero().squeeze(1).tolist()) == set(torch.argsort(direct[i])[:2].tolist())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_bad_sparsity_leaves_model_untouched(bad):
    m = mlp()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ConfigError, match="sparsity"):
        P.prune(m, bad, targets=TARGETS, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert P.masks(m) == {}


def test_errors_name_the_problem_and_touch_nothing():
    m = mlp()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ConfigError, match="calibration"):
        P.prune(m, 0.5, "wanda", targets=TARGETS, progress=False)
    with pytest.raises(ConfigError, match="no batch"):
        P.prune(m, 0.5, "wanda", targets=TARGETS, calibration=[], progress=False)
    with pytest.raises(ConfigError, match="choose one of"):
        P.prune(m, 0.5, "random", targets=TARGETS, progress=False)
    with pytest.raises(ParetuneError, match="matched no module"):
        P.prune(m, 0.5, targets=["nope"], progress=False)
    with pytest.raises(RuntimeError):  # a calibration batch the model cannot take
        P.prune(m, 0.5, "wanda", targets=TARGETS, calibration=[torch.randn(2, 3)], progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert P.masks(m) == {} and all(len(mod._forward_pre_hooks) == 0 for mod in m.modules())


def test_masks_survive_training_steps():
    m = mlp()
    P.prune(m, 0.5, targets=TARGETS, progress=False)
    masks = {n: t.clone() for n, t in P.masks(m).items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()  # writes the pruned weights (dense gradients) ...
    out = m(x)  # ... and the forward pre-hook zeroes them again before use
    for n, mask in masks.items():
        w = m.get_submodule(n).weight
        assert (w[~mask] == 0).all()
        assert (w[mask] != 0).any()
    ref = x
    for i, layer in enumerate(m):
        ref = F.linear(ref, layer.weight * masks[str(i)], layer.bias) if isinstance(layer, nn.Linear) else layer(ref)
    assert torch.allclose(out, ref)
    P.remove_masks(m)
    assert P.masks(m) == {} and all(len(mod._forward_pre_hooks) == 0 for mod in m.modules())


def test_merging_a_lora_into_a_pruned_layer_keeps_its_zeros():
    m = mlp()
    P.prune(m, 0.5, targets=TARGETS, progress=False)
    pruned = {n: m.get_submodule(n).weight.detach().clone() for n in P.masks(m)}
    paretune.adapt(m, "lora", targets=TARGETS, r=2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # a trained-looking B: its ΔW is dense
    paretune.merge(m, "default")
    masks = P.masks(m)
    for n, mk in masks.items():  # zero right after the merge, without apply_masks or a forward pass
        w = m.get_submodule(n).base.weight
        assert (w[~mk] == 0).all() and (w[mk] != pruned[n][mk]).any()
    paretune.unmerge(m, "default")  # M ⊙ (W + ΔW) − ΔW, masked again, is W
    for n, mk in masks.items():
        torch.testing.assert_close(m.get_submodule(n).base.weight, pruned[n])


def test_masklora_hook_equals_merged_model():
    m = mlp()
    P.prune(m, 0.5, targets=TARGETS, progress=False)
    paretune.adapt(m, "lora", name="perp", targets=TARGETS, r=2)
    for n, host in paretune.core.inject.hosts(m):
        host.register_forward_hook(P._masklora_hook("perp", P._matrix_view(host.geometry, host.base.prune_mask)))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(7, 12)
    with torch.no_grad():
        hooked = m(x)
        # independent: W + M ⊙ ΔW on every layer
        ref = x
        for i, layer in enumerate(m):
            if i % 2:
                ref = layer(ref)
                continue
            d = layer.deltas["perp"].delta_weight()
            ref = F.linear(ref, layer.base.weight + layer.base.prune_mask * d, layer.base.bias)
        assert torch.allclose(hooked, ref, atol=1e-6)
        paretune.merge(m, "perp")
        P.apply_masks(m)
        assert torch.allclose(m(x), hooked, atol=1e-5)
    for n, mk in P.masks(m).items():
        assert (m.get_submodule(n).base.weight[~mk] == 0).all()


# -- PERP through the trainer, on a tiny Llama ------------------------------------------------
def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg)


DATA = [{"prompt": f"{a} ->", "completion": f" {b}"} for a, b in
        [("red", "rot"), ("blue", "blau"), ("green", "grun"), ("black", "schwarz")]]


@pytest.mark.parametrize("mode", ["norms-biases", "lora"])
def test_perp_keeps_masks(mode):
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    ids = torch.tensor([[5, 9, 14, 20, 33]])
    rep = P.prune(model, 0.5, "wanda", calibration=[ids], progress=False)
    assert len(rep["layers"]) == 7  # q k v o gate up down
    norms_before = model.model.norm.weight.detach().clone()
    res = P.perp(model, DATA, tok, mode=mode, steps=3, lr=1e-2, batch_size=4, progress=False)
    assert res.metrics["steps"] == 3
    for n, mk in P.masks(model).items():
        mod = model.get_submodule(n)
        w = (mod.base if hasattr(mod, "deltas") else mod).weight
        assert (w[~mk] == 0).all() and (w[mk] != 0).any()
    if mode == "norms-biases":
        assert not torch.equal(model.model.norm.weight, norms_before)
        assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    else:
        assert paretune.adapters(model)["perp"].merged


def test_perp_errors():
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    with pytest.raises(ParetuneError, match="prune"):
        P.perp(model, DATA, tok)
    P.prune(model, 0.5, progress=False)
    with pytest.raises(ConfigError, match="mode"):
        P.perp(model, DATA, tok, mode="full")
