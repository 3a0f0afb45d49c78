"""Checks shared by the tests of the sparse methods (SparseDelta: values at fixed flat positions,
stored as float32 values and int32 indices); imported as a plain module, like layer_chain."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import paretune

from layer_chain import TARGETS, assert_merge_round_trip, assert_only_these_get_gradients, deltas, randomise


def flat_support(d) -> set[int]:
    """The delta's flat positions (row·d_in + col), from its indices."""
    return set(d.indices.tolist())


def assert_values_and_int32_indices_bytes(model: nn.Module, n: int) -> None:
    """``n`` entries in all: stored bytes are n float32 values plus n int32 indices."""
    assert paretune.count(model)["stored_bytes"] == n * (4 + 4)


def assert_merge_touches_only_the_support(model: nn.Module, x: torch.Tensor,
                                          support: Callable[[object], set[int]] = flat_support,
                                          atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Merging changes only the weight entries in ``support(delta)`` (flat positions), never the
    bias, gives the unmerged outputs, and a merge round trip after unmerging does too."""
    hosts = {t: model.get_submodule(t) for t in TARGETS}
    before = {t: h.base.weight.detach().clone() for t, h in hosts.items()}
    bias_before = {t: h.base.bias.detach().clone() for t, h in hosts.items()}
    with torch.no_grad():
        ref = model(x)
    paretune.merge(model)
    for t, h in hosts.items():
        d = h.deltas["default"]
        changed = set((h.base.weight != before[t]).flatten().nonzero().flatten().tolist())
        assert changed <= support(d)
        assert torch.equal(h.base.bias, bias_before[t])  # the bias is not touched
        assert d.delta_bias() is None
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=atol, rtol=rtol)
    paretune.unmerge(model)
    assert_merge_round_trip(model, x, atol=atol, rtol=rtol)


def assert_same_positions(model: nn.Module, loaded: nn.Module, values: bool = False) -> None:
    """Each loaded delta holds the saved one's indices (and, with ``values``, its values)."""
    for t in TARGETS:
        saved, got = deltas(model)[t], deltas(loaded)[t]
        assert torch.equal(saved.indices, got.indices)
        if values:
            assert torch.equal(saved.values, got.values)


def assert_only_the_values_get_gradients(model: nn.Module) -> None:
    """With random values (scale 0.1), a backward pass through a chain() model gives every delta's
    values a non-zero gradient and nothing else one; the indices never require one."""
    randomise(model, scale=0.1)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    assert_only_these_get_gradients(model, (".values",), bank=False)
    for d in deltas(model).values():
        assert not d.indices.requires_grad
