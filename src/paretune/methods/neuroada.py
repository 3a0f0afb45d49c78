"""NeuroAda (Zhang et al. 2025, "NeuroAda: Activating Each Neuron's Potential for
Parameter-Efficient Fine-Tuning", EMNLP 2025).

For every output neuron (row ``i`` of W, shape (d_out, d_in)), the ``k`` input connections of
largest magnitude ``|W[i, j]|`` get a trainable additive bypass ``δ[i, j]``, initialised at zero;
the pre-trained W stays frozen. ΔW is zero elsewhere, so the layer computes (W + ΔW) x and the
adapter merges exactly. Trainable per layer: d_out · k. Stored: the d_out · k values and their
int32 flat positions (:class:`paretune.core.sparse.SparseDelta`).

Following the reference code (github.com/FightingFighting/NeuroAda):

* utils/select_para.py, ``select_perCell`` with ``mag_or_mag="mag"`` (the ``perCell_mag_add``
  runs): positions are ``torch.topk(abs(W), k, dim=1, largest=True)`` on the pre-trained weight,
  row by row (one row per output neuron);
* utils/select_para.py, ``generate_new_params``: the bypass is ``torch.zeros(n)``, a zero start;
* utils/utils.py, ``update_model``: the forward pass is ``F.linear(x, W.flatten().scatter_add(0,
  positions, new_weight).view_as(W), bias)``: the values are added to W as they are, with no
  scaling (``scaling`` = 1);
* ``tune_bias`` defaults to False (train_our.py ``--tuneBias``, store_true; the provided scripts do
  not pass it): the bias is not touched;
* ``k`` defaults to 1, train_our.py's ``--times_num`` default (scripts/percell/perCell_mag_add/
  top1/*.sh use 1, top20/*.sh and the README's quick start 20).

Choices where paretune differs or the reference is silent:

* k > d_in: the reference clamps k to d_in (``if time_para > tensor.size(1)``); paretune refuses it
  with a ConfigError, so that the trainable count is always d_out · k as the formula says.
* Ties: ``torch.topk`` does not specify which of equal magnitudes it returns. paretune takes every
  entry strictly above the row's k-th largest magnitude, then the entries equal to it in order of
  increasing column index until the row has k: deterministic on every device, and the same set as
  topk whenever the row has no tie at its k-th value.
* Magnitudes are compared in float32 (float64 for a float64 weight); casting a half-precision
  weight up keeps every value, so the selection is the one on the weight's own dtype.
* The bypass trains in :func:`paretune.core.dtypes.adapter_dtype` (float32 on half-precision
  bases), where the reference keeps the model's dtype (bfloat16 in its runs).
* Other host kinds (Conv1D, Embedding, Conv2d; the reference adapts Linear layers only): a neuron
  is a row of the (d_out, d_in) matrix view of :mod:`paretune.core.geometry`.
* The positions are chosen from the base weight as it is when the adapter is made; a saved
  adapter stores them, so a load does not choose again.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.config import AdapterConfig
from ..core.geometry import Geometry
from ..core.registry import register
from ..core.sparse import SparseDelta
from ..errors import ConfigError


@dataclasses.dataclass
class NeuroAdaConfig(AdapterConfig):
    """``k``: input connections per output neuron that get a trainable bypass (1 <= k <= d_in)."""

    k: int = 1

    def validate(self) -> None:
        self._positive_int("k")


def top_k_per_row(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True entries per row: the row's ``k`` largest values, ties
    at the k-th value broken towards the lower column index."""
    kth = torch.topk(magnitude, k, dim=1, largest=True, sorted=True).values[:, -1:]
    above = magnitude > kth
    tied = magnitude == kth
    room = k - above.sum(dim=1, keepdim=True)  # how many of the tied entries each row still takes
    mask = above | tied
    rows = (tied.sum(dim=1, keepdim=True) > room).flatten().nonzero().flatten()
    if rows.numel():  # rows with more ties at the k-th value than room: the lower columns win
        sub = tied[rows]
        mask[rows] = above[rows] | (sub & (sub.cumsum(dim=1) <= room[rows]))
    return mask


@register(
    "neuroada",
    config=NeuroAdaConfig,
    summary="NeuroAda (Zhang et al. 2025): a zero-initialised trainable bypass on each neuron's top-k |W| inputs",
    formula="d_out·k",
)
class NeuroAdaDelta(SparseDelta):
    def __init__(self, geometry: Geometry, config: NeuroAdaConfig, *, bank=None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        if config.k > self.d_in:
            raise ConfigError(
                f"neuroada: k={config.k} exceeds the {self.d_in} inputs of a ({self.d_out} x {self.d_in}) "
                f"{self.kind} layer; each neuron has only d_in connections, so use k <= {self.d_in} "
                "(or target other modules)."
            )
        with torch.no_grad():
            w = geometry.matrix().detach()
            magnitude = w.to(torch.promote_types(w.dtype, torch.float32)).abs()
            mask = top_k_per_row(magnitude, config.k)
            flat = mask.flatten().nonzero().flatten()
        self.set_support(flat)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: NeuroAdaConfig) -> int:
        return d_out * config.k
