"""A chain of Linear layers of several shapes, shared by the method tests that check counts and
PEFT equality layer by layer (imported as a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from paretune.core.host import Host

SHAPES = [(8, 16), (16, 8), (12, 12), (30, 7)]  # (d_in, d_out)
TARGETS = [str(i) for i in range(6)]


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


@torch.no_grad()
def assert_merge_round_trip(model: nn.Module, x: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Merged outputs, then unmerged ones, equal the unmerged outputs before."""
    import paretune

    ref = model(x)
    paretune.merge(model)
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=rtol)
    paretune.unmerge(model)
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=rtol)


def assert_only_these_get_gradients(model: nn.Module, suffixes: tuple[str, ...]) -> None:
    """After a backward pass: every adapter tensor ending in ``suffixes`` has a non-zero gradient,
    no other tensor requires one, and the shared bank (if any) stays frozen."""
    for n, p in model.named_parameters():
        if ".deltas." in n:
            assert n.endswith(suffixes) and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    for d in deltas(model).values():
        assert not d.bank.A.requires_grad and d.bank.A.grad is None and d.bank.B.grad is None
