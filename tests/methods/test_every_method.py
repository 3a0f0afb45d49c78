"""The Delta contract, checked for every registered method (a new method is covered here as soon
as it registers): merged == unmerged, save/load round trip, trainable count == the method's own
formula, gradients only on the adapter, unload.

Each method runs with its default options and a small rank, on three tiny models: a random Llama
(Linear layers), a toy MLP, and a model with one Embedding, GPT-2 Conv1D and Conv2d each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

import paretune
from paretune.core import registry
from paretune.core.geometry import geometry_for
from paretune.core.host import Host
from paretune.errors import ParetuneError

from docs_example import DOCS_EXAMPLE, docs_example_registered

# methods that prepend virtual tokens: they extend a transformers model's inputs, so not the toy models
TRANSFORMERS_ONLY = {"prompt-tuning"}
# methods that combine adapters already on the model: tests/methods/test_scalearn.py checks the
# same contract for them (with sources trained first)
COMBINERS = {"scalearn"}
BUILTIN = sorted(m for m in paretune.list_methods() if m not in COMBINERS)
# every built-in method, and the worked example of docs/adding-a-method.md (registered while its
# tests run, by the fixture in conftest.py)
METHODS = BUILTIN + [DOCS_EXAMPLE]
SMALL_RANK = 2
# per-method options for the tiny models, on top of the defaults (a method whose defaults do not
# fit a 8..64-wide layer gets its small settings here)
EXTRA_OPTIONS: dict[str, dict] = {
    # the default 1,000 frequencies exceed the tiny layers (smallest 4 x 12 = 48 entries); scaling 1
    # keeps the random-start ΔW at a size where float32 merge round trips stay within ATOL
    "fourierft": {"n_frequency": 32, "scaling": 1.0},
    "loca": {"n_frequency": 8},  # the paper's 1,000 exceeds the tiny layers
    "subspace": {"dim": 24},  # the default 1,000 exceeds the tiny models' adapted parameters
    "bottleneck": {"bottleneck": 4},  # the default reduction factor 16 leaves no bottleneck on 16-wide layers
    "compacter": {"bottleneck": 4},
    "bitfit": {"add_missing": True},  # the tiny Llama's Linears have no bias
    "poly": {"default_task": 0},  # the suite's forward passes give no task ids
    # as bottleneck; 2 parts, so each step's sparse adapter reaches a live ReLU unit of the toy MLP's
    # 4-wide output layer (with 4 parts a step's few active entries can all sit on dead units)
    "mosa": {"bottleneck": 4, "n_experts": 2},
    "flylora": {"k": 1},  # the default k = 8 exceeds the suite's r = 2
}
ATOL = 1e-5


def small_options(method: str) -> dict:
    spec = registry.get(method)
    opts = {"r": SMALL_RANK} if "r" in spec.config_cls.options() else {}
    opts.update(EXTRA_OPTIONS.get(method, {}))
    return opts


@dataclasses.dataclass
class Subject:
    """A tiny model factory, a batch and how to run the model on it."""

    name: str
    make: Callable[[], nn.Module]
    batch: object
    run_fn: Callable[[nn.Module, object], torch.Tensor]

    @torch.no_grad()
    def run(self, model: nn.Module) -> torch.Tensor:
        return self.run_fn(model, self.batch)

    def run_grad(self, model: nn.Module) -> torch.Tensor:
        return self.run_fn(model, self.batch)


@pytest.fixture(params=["llama", "mlp", "mixed"])
def subject(request) -> Subject:
    kind = request.param
    if kind == "llama":
        return Subject(kind, request.getfixturevalue("make_llama"), request.getfixturevalue("llama_batch"),
                       lambda m, ids: m(ids).logits)
    if kind == "mlp":
        return Subject(kind, request.getfixturevalue("make_mlp"), request.getfixturevalue("mlp_batch"),
                       lambda m, x: m(x))
    return Subject(kind, request.getfixturevalue("make_mixed"), request.getfixturevalue("mixed_batch"),
                   lambda m, b: m(*b))


def targets_for(subject: Subject, method: str, model: nn.Module):
    """The method's default targets (all-linear without them) on the Llama; all-linear on the MLP (a
    method's transformer placements do not exist there); for the mixed model, its modules of kinds
    the method supports."""
    spec = registry.get(method)
    if subject.name == "mlp" and spec.default_targets is not None:
        if "linear" not in spec.kinds:
            pytest.skip(f"{method} adapts no Linear layer")
        return "all-linear"
    if subject.name != "mixed":
        return None
    if method in TRANSFORMERS_ONLY:
        pytest.skip(f"{method} needs a transformers model (its forward hook extends the attention mask and labels)")
    kinds = {"emb": "embedding", "proj": "conv1d", "conv": "conv2d"}
    names = [n for n, k in kinds.items() if k in registry.get(method).kinds]
    if not names:
        pytest.skip(f"{method} adapts none of embedding / conv1d / conv2d")
    return names


def adapted(subject: Subject, method: str) -> nn.Module:
    model = subject.make()
    paretune.adapt(model, method, targets=targets_for(subject, method, model), **small_options(method))
    return model


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 123) -> None:
    """Move every trainable number at random, as training would, so that the delta is not zero."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the adapter has no trainable parameter"
    for p in params:
        p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that is not an adapter's, under its name in the plain model."""
    out = {}
    for n, p in model.named_parameters():
        if ".deltas." in n:
            continue
        out[n.replace(".base.", ".")] = p.detach().clone()
    return out


def assert_no_adapter_left(model: nn.Module) -> None:
    assert not any(isinstance(m, Host) for m in model.modules())
    assert paretune.adapters(model) == {}


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a base module, read from its type (independently of paretune's geometry)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # a LayerNorm / RMSNorm: γ as a column
        return weight.numel(), 1
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:  # a whole block: the width of its output projection (its last Linear)
        return linears[-1].out_features, linears[-1].out_features
    raise AssertionError(f"unexpected adapted module {type(module).__name__}")


# -- tests ------------------------------------------------------------------------------------

def test_the_docs_example_registers_for_its_tests_only():
    assert DOCS_EXAMPLE not in paretune.list_methods()
    with docs_example_registered():
        spec = registry.get(DOCS_EXAMPLE)
        assert spec.formula == "r·d_out" and issubclass(spec.delta_cls, paretune.core.LowRankDelta)
    assert DOCS_EXAMPLE not in paretune.list_methods()


def test_every_method_is_listed_with_its_formula():
    assert BUILTIN, "no method registered"
    for name, line in paretune.list_methods().items():
        spec = registry.get(name)
        assert spec.summary and spec.formula in line and "trainable per layer" in line
        assert spec.delta_cls.method == name and spec.config_cls.method == name


@pytest.mark.parametrize("method", METHODS)
def test_adapter_changes_outputs_once_trained(subject, method):
    """The perturbation used by the other tests really moves the outputs (so they test a non-zero delta)."""
    base_out = subject.run(subject.make())
    model = adapted(subject, method)
    perturb(model)
    out = subject.run(model)
    if method == "prompt-tuning":  # its n virtual positions come first (PEFT's outputs too): compare the rest
        out = out[:, out.shape[1] - base_out.shape[1]:]
    assert (out - base_out).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged(subject, method):
    model = adapted(subject, method)
    perturb(model)
    unmerged = subject.run(model)
    spec = registry.get(method)
    if not spec.delta_cls.mergeable:
        with pytest.raises(ParetuneError, match="cannot be merged"):
            paretune.merge(model)
        return
    before = base_weights(model)
    paretune.merge(model)
    assert paretune.adapters(model)["default"].merged
    torch.testing.assert_close(subject.run(model), unmerged, atol=ATOL, rtol=0)
    paretune.unmerge(model)
    torch.testing.assert_close(subject.run(model), unmerged, atol=ATOL, rtol=0)
    after = base_weights(model)
    for n, w in before.items():
        torch.testing.assert_close(after[n], w, atol=1e-6, rtol=0, msg=f"unmerge left {n} changed")


@pytest.mark.parametrize("method", METHODS)
def test_delta_weight_is_the_dense_reference(subject, method):
    """W + ΔW (delta_weight, in matrix layout) applied as a plain layer gives the fast path's output."""
    model = adapted(subject, method)
    perturb(model)
    hosts = [m for m in model.modules() if isinstance(m, Host)]
    assert hosts
    spec = registry.get(method)
    for host in hosts:
        delta = host.deltas["default"]
        dw = delta.delta_weight()
        if not spec.delta_cls.mergeable:
            assert dw is None
            continue
        assert tuple(dw.shape) == (delta.d_out, delta.d_in)
        base = host.base
        if isinstance(base, nn.Linear):
            x = torch.randn(3, base.in_features)
            ref = x @ (base.weight + dw).T
            for b in (base.bias, delta.delta_bias()):
                if b is not None:
                    ref = ref + b
            with torch.no_grad():
                torch.testing.assert_close(host(x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_unload_after_merge_keeps_outputs(subject, method):
    if not registry.get(method).delta_cls.mergeable:
        pytest.skip(f"{method} is not mergeable (test_merged_equals_unmerged checks merge refuses)")
    model = adapted(subject, method)
    perturb(model)
    expected = subject.run(model)
    changes_bias = any(h.deltas["default"].delta_bias() is not None for h in model.modules() if isinstance(h, Host))
    paretune.merge(model)
    paretune.unload(model)
    assert_no_adapter_left(model)
    torch.testing.assert_close(subject.run(model), expected, atol=ATOL, rtol=0)
    # the plain model has the parameters it had before adapt; a merge that changes biases (Hydra)
    # gives a bias-less layer a bias
    before = {n for n, _ in subject.make().named_parameters()}
    after = {n for n, _ in model.named_parameters()}
    assert before <= after and all(n.endswith(".bias") for n in after - before)
    if not changes_bias:
        assert after == before


@pytest.mark.parametrize("method", METHODS)
def test_unload_without_merge_gives_back_the_base(subject, method):
    original = subject.make()
    base_out = subject.run(original)
    model = adapted(subject, method)
    perturb(model)
    paretune.unload(model)
    assert_no_adapter_left(model)
    torch.testing.assert_close(subject.run(model), base_out, atol=ATOL, rtol=0)
    restored = dict(model.named_parameters())
    for n, w in original.named_parameters():
        torch.testing.assert_close(restored[n].detach(), w.detach(), atol=ATOL, rtol=0, msg=f"{n} not restored")


@pytest.mark.parametrize("method", METHODS)
def test_inactive_adapter_means_the_base(subject, method):
    base_out = subject.run(subject.make())
    model = adapted(subject, method)
    perturb(model)
    on = subject.run(model)
    paretune.set_active(model, [])
    torch.testing.assert_close(subject.run(model), base_out, atol=ATOL, rtol=0)
    paretune.set_active(model, "default")
    torch.testing.assert_close(subject.run(model), on, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_onto_fresh_base(subject, method, tmp_path):
    model = adapted(subject, method)
    perturb(model)
    expected = subject.run(model)
    paretune.save(model, tmp_path / "adapter")

    fresh = subject.make()
    paretune.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(subject.run(fresh), expected, atol=ATOL, rtol=0)
    rec, saved = paretune.adapters(fresh)["default"], paretune.adapters(model)["default"]
    assert (rec.method, rec.config, rec.targets) == (saved.method, saved.config, saved.targets)
    # what was saved is what the method says it stores, and loading put those very numbers back
    for (name, host), (_, fresh_host) in zip(_hosts(model), _hosts(fresh)):
        got = fresh_host.deltas["default"].stored_state()
        for key, t in host.deltas["default"].stored_state().items():
            assert torch.equal(got[key], t), f"{name}.{key} differs after load"


def _hosts(model: nn.Module) -> list[tuple[str, Host]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Host)]


@pytest.mark.parametrize("method", METHODS)
def test_count_equals_the_methods_formula(subject, method):
    original = subject.make()
    model = adapted(subject, method)
    spec = registry.get(method)
    rec = paretune.adapters(model)["default"]
    assert rec.targets, "nothing adapted"

    by_formula = 0
    shapes = []
    for target in rec.targets:
        g = geometry_for(original.get_submodule(target))  # the unadapted module, named as in the model
        g.name = target
        assert (g.d_out, g.d_in) == layer_shape(original.get_submodule(target))
        shapes.append((g.d_out, g.d_in))
        by_formula += spec.delta_cls.layer_formula(g, rec.config)
    by_formula += spec.delta_cls.shared_formula(shapes, rec.config)  # once per adapter (subspace's θ_d)
    requires_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)

    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == by_formula == requires_grad > 0
    assert cost["base"] == sum(p.numel() for p in original.parameters())
    assert cost["stored_bytes"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_get_gradients(subject, method):
    model = adapted(subject, method)
    perturb(model)
    model.train()
    out = subject.run_grad(model)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    ((out - target) ** 2).mean().backward()

    adapter, base = 0, 0
    for n, p in model.named_parameters():
        if ".deltas.default." in n:
            adapter += 1
            assert p.requires_grad, n
            assert p.grad is not None, f"adapter parameter {n} got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"adapter parameter {n}: zero gradient"
        else:
            base += 1
            assert not p.requires_grad, f"base parameter {n} is trainable"
            assert p.grad is None, f"base parameter {n} got a gradient"
    assert adapter > 0 and base > 0


# merge / unmerge / unload on a float64 model keep float64 precision (the base is not rounded
# through float32).
@pytest.mark.parametrize("method", [m for m in BUILTIN if registry.get(m).delta_cls.mergeable] + [DOCS_EXAMPLE])
def test_float64_model_round_trips_at_float64_precision(method):
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)).double()
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)).double()
    model.load_state_dict(original.state_dict())
    model.eval()
    spec = registry.get(method)
    if "linear" not in spec.kinds:
        pytest.skip(f"{method} adapts no Linear layer")
    targets = "all-linear" if spec.default_targets is not None else None  # no transformer sites in a Sequential
    paretune.adapt(model, method, targets=targets, **small_options(method))
    perturb(model)
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        paretune.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-12, rtol=0)
        paretune.unmerge(model)
    paretune.unload(model)
    for (n, w), (_, w0) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(w.detach(), w0.detach(), atol=1e-12, rtol=0, msg=n)
