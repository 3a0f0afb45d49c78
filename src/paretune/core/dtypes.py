"""The precision adapters compute in."""

from __future__ import annotations

import torch

ADAPTER_DTYPES = (torch.float32, torch.float64)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 on half-precision bases (as PEFT's ``autocast_adapter_dtype``) and
    in the base's own precision on float32 / float64 bases; dense deltas are computed in it too."""
    return weight.dtype if weight.dtype in ADAPTER_DTYPES else torch.float32
