"""A chain of Linear layers of several shapes, and the checks the method tests share: counts,
zero start, merge round trip, save / load, gradient placement, refused options that leave the model
as it was, PEFT pairs (imported as a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError

SHAPES = [(8, 16), (16, 8), (12, 12), (30, 7)]  # (d_in, d_out)
TARGETS = [str(i) for i in range(6)]
CHAIN_SHAPES = [(16, 8), (8, 16), (12, 8), (12, 12), (30, 12), (7, 30)]  # (d_out, d_in) of chain()'s layers


def chain(seed: int = 0) -> nn.Sequential:
    """Linear layers of every shape in SHAPES (and 8->12, 12->30 to chain them)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 12), nn.Linear(12, 12),
                         nn.Linear(12, 30), nn.Linear(30, 7))


def deltas(model: nn.Module, name: str = "default") -> dict:
    """Adapter ``name``'s delta on every host, by module name."""
    return {n: m.deltas[name] for n, m in model.named_modules() if isinstance(m, Host)}


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 3, scale: float = 1.0) -> None:
    """Random values (times ``scale``) for every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


# -- counts and init ---------------------------------------------------------------------------

def assert_trainable_count(model: nn.Module, expected: int) -> dict:
    """paretune.count's trainable and formula, and the tensors that require a gradient, all equal
    ``expected``; returns the count."""
    requires_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == requires_grad == expected
    return cost


def assert_zero_delta_at_init(make_llama, llama_batch, method: str, tensor: str, **options) -> nn.Module:
    """Adapting a tiny Llama: every delta's ``tensor`` and ΔW are zero, the logits those of the base.
    Returns the adapted model."""
    base, model = make_llama(), make_llama()
    paretune.adapt(model, method, **options)
    for d in deltas(model).values():
        assert torch.count_nonzero(getattr(d, tensor)) == 0
        assert torch.count_nonzero(d.delta_weight()) == 0
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)
    return model


# -- merge, save / load, gradients -------------------------------------------------------------

@torch.no_grad()
def assert_merge_round_trip(model: nn.Module, x: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Merged outputs, then unmerged ones, equal the unmerged outputs before."""
    ref = model(x)
    paretune.merge(model)
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=rtol)
    paretune.unmerge(model)
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=rtol)


def assert_save_load_exact(model: nn.Module, path, x: torch.Tensor,
                           make: Callable[[], nn.Module] = chain) -> nn.Module:
    """Saved to ``path`` and loaded onto ``make()``: the same outputs to the bit. Returns the loaded model."""
    with torch.no_grad():
        ref = model(x)
    paretune.save(model, path)
    fresh = make()
    paretune.load(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    return fresh


def assert_only_these_get_gradients(model: nn.Module, suffixes: tuple[str, ...], bank: bool = True) -> None:
    """After a backward pass: every adapter tensor ending in ``suffixes`` has a non-zero gradient,
    no other tensor requires one, and (``bank``) the shared bank's A and B stay frozen."""
    for n, p in model.named_parameters():
        if ".deltas." in n:
            assert n.endswith(suffixes) and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    if bank:
        for d in deltas(model).values():
            assert not d.bank.A.requires_grad and d.bank.A.grad is None and d.bank.B.grad is None


# -- refused options ---------------------------------------------------------------------------

@contextmanager
def left_unchanged(model: nn.Module, x: torch.Tensor | None = None):
    """Around a refused adapt: afterwards no host and no adapter, the same state dict (keys and
    values) and, given ``x``, the same outputs to the bit."""
    state = {n: t.clone() for n, t in model.state_dict().items()}
    if x is not None:
        with torch.no_grad():
            before = model(x)
    yield
    assert not any(isinstance(m, Host) for m in model.modules())
    assert paretune.adapters(model) == {}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in state.items())
    if x is not None:
        with torch.no_grad():
            assert torch.equal(model(x), before)


def assert_bad_options_refused(method: str, bad: dict, model: nn.Module | None = None) -> None:
    """``bad`` is a ConfigError, and the model (a 4 -> 4 Linear by default) keeps its plain Linear."""
    model = nn.Sequential(nn.Linear(4, 4)) if model is None else model
    with pytest.raises(ConfigError):
        paretune.adapt(model, method, **bad)
    assert isinstance(model[0], nn.Linear) and paretune.adapters(model) == {}


# -- PEFT --------------------------------------------------------------------------------------

def peft_pairs(ours: nn.Module, peft_model, targets, copy: Callable) -> list:
    """(our delta, PEFT's layer) for each target, after ``copy(delta, layer, g)`` wrote the same random
    values into both (g: one generator seeded 5, in target order, under no_grad)."""
    g = torch.Generator().manual_seed(5)
    pairs = []
    for t in targets:
        d = ours.get_submodule(t).deltas["default"]
        layer = peft_model.base_model.model.get_submodule(t)
        with torch.no_grad():
            copy(d, layer, g)
        pairs.append((d, layer))
    return pairs
