"""Low-rank error correction of a quantised model, trained against the float model (INT2.1's LREC).

Paper: Chai, Gkountouras, Ko, Chen, Jiang and Jin 2023, "INT2.1: Towards Fine-Tunable Quantized
Large Language Models with Error Correction through Low-Rank Adaptation" (arXiv:2306.08162). Its
Low-Rank Error Correction (LREC) puts a LoRA on the quantised model and trains it to make the
quantised model's outputs match the float model's, so that the k-bit base plus a small float
adapter behaves like the float model ("INT2.1": an INT2 model at about 1.05x its size).

:func:`correct_quantization` does exactly that on top of :func:`paretune.compress.quantize`:

* a LoRA (or any registered weight-delta method, ``method=``) is added to the quantised layers
  (``targets=None``: every quantised layer), B = 0 at the start, so the corrected model starts as
  the quantised one;
* it is trained by :func:`paretune.compress.lowrank.distill` with ``train="trainable"`` (only the
  adapter): the loss is ``KL(teacher ‖ student)`` on the next-token distributions plus the MSE of
  the last hidden states (both weights 1). The paper describes the objective as closing the output
  gap to the float model; which outputs, and their weights, are our choice: the logit KL is the
  distribution the model is used for and the hidden-state term gives a dense signal per position.
* the teacher is the float model (load it again; the quantised model no longer has the float
  weights). It runs in ``torch.no_grad``.

The correction is an ordinary adapter named ``name`` (default ``"correction"``): save it with
:func:`paretune.save`, count it with :func:`paretune.count`, and keep it unmerged, since merging it
into the k-bit base quantises the sum again and gives most of the error back. A task adapter can be
added beside it (they stack).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from ..errors import ConfigError, ParetuneError
from .lowrank import distill
from .quantize import quantized_modules

__all__ = ["correct_quantization"]


def correct_quantization(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    method: str = "lora",
    r: int = 16,
    targets: Sequence[str] | str | None = None,
    name: str = "correction",
    feature_layers: Sequence[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> list[float]:
    """Add an error-correcting adapter to the quantised ``model`` and train it against the float
    ``teacher`` (INT2.1's LREC; module docstring). ``batches``: token-id tensors or dicts of model
    inputs, cycled for ``steps`` steps. ``method`` / ``r`` / ``options`` go to
    :func:`paretune.adapt` (``r`` only for methods that take it). Returns the loss per step; the
    model ends in eval mode with the adapter ``name`` active.

    ``lr`` 1e-4 and ``r`` 16 are defaults of ours (the paper trains LoRA with its own per-model
    settings); the feature term uses the last hidden state (``feature_layers``, as in
    :func:`~paretune.compress.lowrank.distill`)."""
    import dataclasses

    from .. import api
    from ..core import registry

    found = quantized_modules(model)
    if not found:
        raise ParetuneError("correct_quantization: the model has no quantised layer; quantise it first "
                            "(paretune.compress.quantize(model, bits=4)).")
    if teacher is model:
        raise ConfigError("correct_quantization: the teacher must be the float model, loaded separately, not the "
                          "quantised model itself.")
    if quantized_modules(teacher):
        raise ConfigError("correct_quantization: the teacher is quantised too; load the float model as the teacher.")
    spec = registry.get(method)
    if "r" in {f.name for f in dataclasses.fields(spec.config_cls)} and "r" not in options:
        options["r"] = r
    api.adapt(model, method, name=name, targets=list(found) if targets is None else targets, **options)
    return distill(model, teacher, batches, steps, lr=lr, feature_layers=feature_layers, train="trainable",
                   progress=progress)
