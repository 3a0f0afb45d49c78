"""SparseDelta: the base of every delta that trains a fixed set of entries of W.

ΔW is zero except at ``n`` positions of the (d_out, d_in) matrix, chosen once (a mask from the
weights, gradients, a seed...) and held as int32 indices; only the values there train and are
saved (values + indices). A subclass chooses the positions in ``__init__`` and calls
:meth:`SparseDelta.set_support`; it inherits the forward pass, ``delta_weight``, the sparse merge
(only the masked entries of W are written) and the file format.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError
from .config import AdapterConfig
from .delta import Delta, add_dense
from .dtypes import adapter_dtype
from .geometry import Geometry


class SparseDelta(Delta):
    """ΔW[rows, cols] = scaling · values, zero elsewhere.

    ``indices`` (int32, flat positions ``row · d_in + col`` in the (d_out, d_in) matrix view,
    sorted and unique) is a buffer; ``values`` the trainable parameter. The forward pass builds
    the dense ΔW (one scatter, parameter-sized) and applies it as the base op would, so it runs on
    every host kind; merging and unmerging add or subtract the values at their positions only.
    Saved: ``values`` and ``indices``; a load takes the positions from the file, so a mask chosen
    from data or weights needs nothing else to be rebuilt.
    """

    def __init__(self, geometry: Geometry, config: AdapterConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.scaling: float = 1.0

    # -- the support -------------------------------------------------------------------------
    def set_support(self, flat: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Fix the trainable positions (flat indices into the (d_out, d_in) matrix) and their
        starting values (default zero, so ΔW = 0 at the start)."""
        flat = torch.as_tensor(flat).flatten().long()
        size = self.d_out * self.d_in
        if flat.numel() == 0:
            raise ConfigError(f"{self.method}: the mask selects no entry of a ({self.d_out} x {self.d_in}) layer; "
                              "raise the count or the fraction.")
        if int(flat.min()) < 0 or int(flat.max()) >= size:
            raise ConfigError(f"{self.method}: mask positions must lie in [0, {size}) for a "
                              f"({self.d_out} x {self.d_in}) layer.")
        flat, order = torch.sort(flat)
        if bool((flat[1:] == flat[:-1]).any()):
            raise ConfigError(f"{self.method}: the mask holds a position twice; positions must be unique.")
        w = self.geometry.weight
        dtype = adapter_dtype(w)
        if values is None:
            start = torch.zeros(flat.numel(), dtype=dtype, device=w.device)
        else:
            start = values.flatten()[order].to(w.device, dtype)
        self.register_buffer("indices", flat.to(torch.int32).to(w.device), persistent=False)
        self.values = nn.Parameter(start)

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.indices.long()
        return flat // self.d_in, flat % self.d_in

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices, self.scaling * self.values

    # -- the contract ------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """ΔW as a dense (d_out, d_in) matrix, differentiable in ``values``."""
        flat = torch.zeros(self.d_out * self.d_in, dtype=self.values.dtype, device=self.values.device)
        flat = flat.index_add(0, self.indices.long(), self.values * self.scaling)
        return flat.view(self.d_out, self.d_in)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return add_dense(self, x, base_out, self.dense())

    def delta_weight(self) -> torch.Tensor:
        return self.dense()

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values.detach()}

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Take the positions and values from the file (the count must match the config's)."""
        self.check_stored(state, where)
        flat = state["indices"].long()
        size = self.d_out * self.d_in
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= size
                             or bool((flat[1:] <= flat[:-1]).any())):
            raise AdapterFileError(f"{where or 'a module'}: saved sparse positions are out of range or not sorted "
                                   "and unique; the file is corrupt.")
        self.indices.copy_(flat.to(self.indices.dtype))
        self.values.copy_(state["values"].to(self.values.dtype))
