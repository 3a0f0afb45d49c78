"""Lottery tickets by iterative magnitude pruning (Frankle & Carbin 2019, "The Lottery Ticket
Hypothesis: Finding Sparse, Trainable Neural Networks").

The procedure (the paper's Section 1, "identifying winning tickets", iterative pruning):

1. initialise the network, θ0 (``make_model()`` under ``torch.manual_seed(seed)``), and train it
   (round 0, dense);
2. prune ``prune_fraction_per_round`` of the weights still remaining, lowest ``|W|`` of the trained
   weights first, per layer (the paper's choice for its fully connected and small convolutional
   networks) or over all targeted layers at once (``scope="global"``, the paper's choice for VGG-19
   and ResNet-18);
3. reset the remaining weights and train again, with the mask held fixed; repeat from 2.

The reset of step 3 (``rewind``):

* ``"init"``: back to θ0 (the winning-ticket procedure);
* an int ``k``: back to the weights after ``k`` optimizer steps of round 0 (late rewinding:
  Frankle, Dziugaite, Roy & Carbin 2020, "Linear Mode Connectivity and the Lottery Ticket
  Hypothesis"); ``0`` is θ0;
* ``"none"``: no reset; training continues from the trained, pruned weights (prune and fine-tune);
* ``"reinit"``: a fresh random initialisation each round (``make_model()`` under
  ``torch.manual_seed(seed + round)``), the paper's random-reinitialisation control.

Choices the paper leaves to each network: every targeted layer is pruned at the same rate here
(the paper prunes LeNet's output layer at half the rate: leave it out of ``targets``, or use
``scope="global"``); biases are never pruned (as in the paper); each round removes
``floor(p · remaining)`` weights per layer (or in total). Masks are the modules' ``prune_mask``
buffers of :mod:`paretune.compress.pruning`, and the weights are multiplied by them after every
optimizer step (through the ``on_step`` callback that ``train_fn`` must call), so pruned weights
stay exactly zero whatever the optimizer.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Union

import torch
from torch import nn

from ..core.geometry import geometry_for
from ..core.inject import Targets, match_targets
from ..errors import ConfigError, ParetuneError
from .pruning import KINDS, MASK, _install, _matrix_view, apply_masks, lowest_k

Rewind = Union[str, int]
TrainFn = Callable[[nn.Module, Callable[[int], None]], float]

__all__ = ["iterative_magnitude_pruning", "LotteryResult", "RoundResult"]


@dataclasses.dataclass
class RoundResult:
    """One round: 0 is the dense network, then one per pruning step."""

    round: int
    accuracy: float
    remaining_weights: int  # unpruned weights of the targeted layers
    targeted_weights: int
    fraction_remaining: float
    layers: dict[str, int]  # remaining weights per targeted layer
    seconds: float


@dataclasses.dataclass
class LotteryResult:
    rounds: list[RoundResult]
    rewind: Rewind
    model: nn.Module  # the last round's trained, pruned model (masks on it)

    def as_rows(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.rounds]


def _check(rounds: Any, fraction: Any, rewind: Any, scope: Any) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds={rounds!r}: give the number of pruning rounds, an int >= 0.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"prune_fraction_per_round={fraction!r}: give the fraction of remaining weights removed "
                          "each round, in (0, 1) (the paper uses 0.2 for fully connected layers).")
    ok = rewind in ("init", "none", "reinit") or (isinstance(rewind, int) and not isinstance(rewind, bool)
                                                  and rewind >= 0)
    if not ok:
        raise ConfigError(f"rewind={rewind!r}: choose 'init', 'none', 'reinit', or a step k >= 0 to rewind to.")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope={scope!r}: choose 'layer' (each layer pruned alike) or 'global'.")


def _bases(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    from ..core.host import Host

    out = {}
    for n in names:
        m = model.get_submodule(n)
        out[n] = m.base if isinstance(m, Host) else m
    return out


def _next_masks(bases: dict[str, nn.Module], fraction: float, scope: str) -> dict[str, torch.Tensor]:
    """Kept-masks (native layout) after pruning ``fraction`` of each layer's (or all layers')
    remaining weights by trained magnitude; already pruned weights stay pruned."""
    scores, geos = {}, {}
    for n, b in bases.items():
        g = geometry_for(b)
        geos[n] = g
        s = g.matrix().detach().abs().float()
        old = b._buffers.get(MASK)
        if old is not None:
            s = s.masked_fill(~_matrix_view(g, old), -1.0)  # ranks lowest: stays pruned
        scores[n] = s

    def count(n: str) -> int:
        old = bases[n]._buffers.get(MASK)
        return int((~old).sum()) if old is not None else 0

    out = {}
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        already = sum(count(n) for n in bases)
        pruned = lowest_k(flat, already + int(fraction * (flat.numel() - already)))
        for (n, s), part in zip(scores.items(), pruned.split([s.numel() for s in scores.values()])):
            out[n] = geos[n].to_native(~part.view(s.shape)).contiguous()
    else:
        for n, s in scores.items():
            already = count(n)
            pruned = lowest_k(s, already + int(fraction * (s.numel() - already)))
            out[n] = geos[n].to_native(~pruned).contiguous()
    return out


def iterative_magnitude_pruning(
    make_model: Callable[[], nn.Module],
    train_fn: TrainFn,
    rounds: int,
    prune_fraction_per_round: float = 0.2,
    *,
    rewind: Rewind = "init",
    targets: Targets = None,
    scope: str = "layer",
    seed: int = 0,
    progress: bool = True,
) -> LotteryResult:
    """Run iterative magnitude pruning (see the module docstring) and return each round's accuracy
    and remaining weights.

    ``make_model()`` builds a fresh network (its random init is drawn under the seed set just
    before the call). ``train_fn(model, on_step)`` trains ``model`` in place and returns its test
    accuracy; it must call ``on_step(step)`` after each optimizer step (``step`` counting from 1),
    which applies the masks and, for ``rewind=k``, records the weights after step ``k`` of round 0.
    ``rounds`` pruning rounds follow the dense round 0, so ``rounds + 1`` results come back; after
    round ``r`` about ``(1 - prune_fraction_per_round) ** r`` of the targeted weights remain.
    ``targets``: as in :func:`paretune.adapt` (default every Linear / Conv1D but an output head
    named lm_head / classifier / score).
    """
    _check(rounds, prune_fraction_per_round, rewind, scope)
    torch.manual_seed(seed)
    model = make_model()
    names = match_targets(model, targets, KINDS, "lottery")
    theta0 = copy.deepcopy(model.state_dict())
    rewind_state: dict[str, torch.Tensor] | None = theta0 if rewind in ("init", 0) else None
    bar = None
    if progress:
        from ..progress import bar as progress_bar

        bar = progress_bar(total=rounds + 1, desc=f"lottery (rewind={rewind})", unit="round", leave=False)
    results: list[RoundResult] = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        if r > 0:
            kept = _next_masks(_bases(model, names), prune_fraction_per_round, scope)
            if rewind == "reinit":
                torch.manual_seed(seed + r)
                model = make_model()
            elif rewind != "none":
                model.load_state_dict(rewind_state)
            for n, b in _bases(model, names).items():
                old = b._buffers.get(MASK)
                if old is not None and rewind != "reinit":
                    kept[n] = kept[n] & old
                _install(b, kept[n])
            apply_masks(model)
        seen = {"last": 0}

        def on_step(step: int, *_: Any, _r: int = r) -> None:
            nonlocal rewind_state
            apply_masks(model)
            seen["last"] = step
            if _r == 0 and isinstance(rewind, int) and not isinstance(rewind, bool) and step == rewind:
                rewind_state = copy.deepcopy(model.state_dict())

        accuracy = float(train_fn(model, on_step))
        apply_masks(model)
        if r == 0 and rounds > 0 and rewind_state is None and rewind not in ("none", "reinit"):
            raise ParetuneError(f"rewind={rewind}: train_fn called on_step only up to step {seen['last']}, so the "
                                f"weights after step {rewind} were never seen; call on_step(step) after every "
                                "optimizer step, or rewind to an earlier step.")
        bases = _bases(model, names)
        layers = {}
        for n, b in bases.items():
            m = b._buffers.get(MASK)
            layers[n] = int(m.sum()) if m is not None else b.weight.numel()
        total = sum(b.weight.numel() for b in bases.values())
        remaining = sum(layers.values())
        results.append(RoundResult(r, accuracy, remaining, total, remaining / total, layers,
                                   time.perf_counter() - t0))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{accuracy:.3f}", remaining=f"{remaining / total:.3f}")
    if bar is not None:
        bar.close()
    return LotteryResult(results, rewind, model)
