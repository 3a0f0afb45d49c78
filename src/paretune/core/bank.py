"""Banks: what one adapter shares across all its layers, built once by ``Delta.make_bank``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Bank(nn.Module):
    """Frozen tensors and settings shared by every layer of one adapter (VeRA's and RandLoRA's
    random bases, NOLA's cache decision, LaMDA++'s rank allocation).

    Tensors become non-persistent buffers: the bank is registered in every delta of the adapter,
    so it moves with the model once, stays one object, and is never saved (a seed regenerates it).
    Other values are plain attributes. ``Bank(A=a, B=b)``, then ``bank.A``.
    """

    def __init__(self, **values: Any):
        super().__init__()
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(key, value, persistent=False)
            else:
                setattr(self, key, value)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._buffers.items() if v is not None)
        return shapes
