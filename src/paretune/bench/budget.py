"""Budget matching: the size knob of a method that makes its trainable count closest to a budget.

A method's *knob* is the one integer config option that sets its size: the ``knob`` of its
bench tuning (:mod:`paretune.bench.tuning`) when it has one, else ``r`` when its config has an
``r`` field (LoRA, PiSSA), else none (a method of fixed size: its count is what it is, whatever
the budget).

The count is the method's own formula (``delta_cls.trainable_formula``) summed over the layers
the targets select, so nothing is built: matching a budget on a 135M-parameter model takes
milliseconds. Layers are grouped by shape, and every knob value from 1 to the smallest
``min(d_out, d_in)`` of the targeted layers (or the tuning's ``knob_max``) is scanned (no
monotonicity is assumed); ties go to the smaller value.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

from torch import nn

from ..core import registry
from ..core.delta import Delta
from ..core.geometry import Geometry, geometry_for
from ..core.inject import Targets, match_targets
from ..errors import ParetuneError
from .tuning import tuning_of


class BudgetError(ParetuneError):
    """No setting of a method's knob comes near the requested budget."""


@dataclasses.dataclass(frozen=True)
class BudgetMatch:
    method: str
    budget: int | None
    knob: str | None  # the option that was set, None for a method of fixed size
    options: dict[str, Any]
    trainable: int  # the formula's count with these options


def knob_of(spec: registry.MethodSpec) -> str | None:
    """The integer option that sets a method's size, or None if it has none."""
    return tuning_of(spec.name).knob or ("r" if "r" in spec.config_cls.options() else None)


def layers(model: nn.Module, method: str, targets: Targets = None,
           options: dict[str, Any] | None = None) -> list[Geometry]:
    """The geometries (named) of the layers ``method`` would adapt (``options``: the method's, where
    they choose its default sites). Raises :class:`paretune.errors.TargetError` when the method can
    adapt none of the targets."""
    spec = registry.get(method)
    config = spec.config_cls.from_dict(dict(options or {}))
    out = []
    for name in match_targets(model, spec.targets_for(model, targets, config), spec.kinds, spec.name):
        g = geometry_for(model.get_submodule(name))
        g.name = name
        out.append(g)
    return out


def layer_shapes(model: nn.Module, method: str, targets: Targets = None,
                 options: dict[str, Any] | None = None) -> Counter:
    """``Counter({(d_out, d_in): how many targeted layers have that shape})`` (see :func:`layers`)."""
    return Counter((g.d_out, g.d_in) for g in layers(model, method, targets, options))


def _compact(cls: type[Delta], layers_: Counter | Sequence[Geometry]) -> Counter | Sequence[Geometry]:
    """Layers grouped by shape, unless the method's count needs each layer (its ``layer_formula``)."""
    if isinstance(layers_, Counter) or cls.layer_formula.__func__ is not Delta.layer_formula.__func__:
        return layers_
    return Counter((g.d_out, g.d_in) for g in layers_)


def formula_count(method: str, shapes: Counter | Sequence[Geometry], options: dict[str, Any]) -> int:
    """Trainable parameters of ``method`` with ``options`` on these layers, by formula: ``shapes``
    is a Counter of (d_out, d_in) or the layers' geometries (needed by a method whose count depends
    on more than the shape: it overrides ``layer_formula``)."""
    spec = registry.get(method)
    config = spec.config_cls.from_dict(options)
    cls = spec.delta_cls
    shapes = _compact(cls, shapes)
    if not isinstance(shapes, Counter):
        per_layer = sum(cls.layer_formula(g, config) for g in shapes)
        return per_layer + cls.shared_formula([(g.d_out, g.d_in) for g in shapes], config)
    per_layer = sum(n * cls.trainable_formula(d_out, d_in, config) for (d_out, d_in), n in shapes.items())
    return per_layer + cls.shared_formula(list(shapes.elements()), config)


def trainable_count(model: nn.Module, method: str, options: dict[str, Any] | None = None,
                    targets: Targets = None) -> int:
    """Trainable parameters ``paretune.adapt(model, method, targets=targets, **options)`` would add."""
    return formula_count(method, layers(model, method, targets, options), dict(options or {}))


def plan_budget(model: nn.Module, method: str, budget: int | None, targets: Targets = None,
                options: dict[str, Any] | None = None, tolerance: float | None = 2.0) -> BudgetMatch:
    """The knob value whose trainable count is closest to ``budget`` (see the module docstring).

    ``options``: other options held fixed (e.g. ``{"alpha": 16}``). ``tolerance``: the closest
    count must lie within a factor ``tolerance`` of the budget, else :class:`BudgetError` says
    which budgets the method can reach (``None``: accept the closest, however far).
    """
    spec = registry.get(method)
    base = {**tuning_of(spec.name).options, **(options or {})}  # the bench's fixed options, then the caller's
    geoms = layers(model, method, targets, base)
    shapes = _compact(spec.delta_cls, geoms)
    knob = knob_of(spec)
    if knob is None or budget is None:
        return BudgetMatch(spec.name, budget, None, base, formula_count(method, shapes, base))
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise BudgetError(f"budget={budget!r} is invalid; give a number of trainable parameters >= 1.")
    if knob in base:
        raise BudgetError(f"{method}: option {knob!r} is what the budget sets; do not fix it as well.")
    top = tuning_of(spec.name).knob_max or min(min(g.d_out, g.d_in) for g in geoms)
    best: tuple[int, int] | None = None  # (count, value)
    low = high = None
    errors: list[str] = []
    for value in range(1, top + 1):
        try:
            n = formula_count(method, shapes, {**base, knob: value})
        except ParetuneError as e:  # a value the method's validation rejects
            errors.append(str(e))
            continue
        low = n if low is None else min(low, n)
        high = n if high is None else max(high, n)
        if best is None or abs(n - budget) < abs(best[0] - budget):
            best = (n, value)
    if best is None:
        raise BudgetError(f"{method}: no value of {knob} in 1..{top} is valid on this model"
                          + (f" ({errors[0]})" if errors else "") + ".")
    count, value = best
    if tolerance is not None and not (budget / tolerance <= count <= budget * tolerance):
        raise BudgetError(
            f"{method}: no {knob} fits a budget of {budget:,} trainable parameters on these "
            f"{len(geoms)} layers; the closest is {knob}={value} with {count:,}. "
            f"{method} reaches {low:,} ({knob}=1) to {high:,} ({knob}={top}); choose a budget in that range."
        )
    return BudgetMatch(spec.name, budget, knob, {**base, knob: value}, count)


def match_budget(model: nn.Module, method: str, budget: int, targets: Targets = None,
                 options: dict[str, Any] | None = None, tolerance: float | None = 2.0) -> dict[str, Any]:
    """Options for ``method`` (its size knob set) whose trainable count is closest to ``budget``;
    a method without a knob gets ``options`` unchanged (its fixed count). See :func:`plan_budget`."""
    return plan_budget(model, method, budget, targets, options, tolerance).options


def budgets_for_knob_values(model: nn.Module, method: str, values: Sequence[int],
                            targets: Targets = None) -> list[int]:
    """The trainable counts of ``method`` at these knob values (e.g. LoRA r=2 and r=8): budgets
    that give that method exactly those sizes."""
    spec = registry.get(method)
    knob = knob_of(spec)
    if knob is None:
        raise BudgetError(f"{method} has no size option to set.")
    shapes = layers(model, method, targets)
    return [formula_count(method, shapes, {knob: v}) for v in values]
