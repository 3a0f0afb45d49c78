"""The public operations on an adapted model: adapt, set_active, merge, unmerge, unload,
per_sample (paretune.save/load and PEFT interop live in io.py and peft_io.py)."""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from .core import quant, registry
from .core.geometry import QuantizedLinearGeometry, one_quantized_merge_warning
from .core.host import Host
from .core.inject import Targets, hosts, match_targets, unwrap, wrap
from .core.serving import SamplePlan
from .core.state import AdapterInfo, AdapterRecord, drop_state, has_state, record_of, state_of
from .errors import ConfigError, ParetuneError, TargetError
from .progress import bar

if TYPE_CHECKING:
    from .configs import MethodConfig


def adapt(
    model: nn.Module,
    method: "str | MethodConfig",
    *,
    name: str = "default",
    targets: Targets = None,
    bits: int | None = None,
    **options,
) -> nn.Module:
    """Add adapter ``name`` of ``method`` to ``model`` in place and return the model.

    ``method``: a method name (``paretune methods`` lists them) or a config object
    (``paretune.LoraConfig(r=8, targets=[...])``, ``paretune.MethodConfig("vera", r=256)``), whose
    options, targets and bits are used; options or ``targets``/``bits`` given here as well
    override the object's.

    ``targets``: ``None`` (the method's default targets, else "all-linear"), ``"all-linear"``
    (every Linear and GPT-2 Conv1D but the output head), a regex matching whole module names, or
    a list of module names or suffixes.
    ``options`` are the method's config fields (``paretune methods`` lists them); unknown or
    out-of-range ones raise :class:`paretune.errors.ConfigError`. For a low-rank method (LoRA
    and its variants with a rank ``r``) an ``r`` above the smaller side (min(d_out, d_in)) of every
    targeted layer is refused: the product B·A cannot have a higher rank than that, so the extra
    parameters would train nothing new. When only some layers are that narrow (the key/value
    projections of a grouped-query model under a large r) it is a warning naming them, since one r
    serves every layer. ``alpha=0`` is accepted with a warning: the scaling alpha/r is then 0 and
    the adapter changes nothing.

    ``bits`` (1, 2, 4 or 8) makes a k-bit adapter (:mod:`paretune.core.quant`): its weight tensors
    train quantised (straight-through) and are saved packed at that many bits, plus two numbers
    per tensor.

    Every other parameter (the base, earlier adapters) is frozen; the new adapter's are
    trainable. The new adapter is
    added to the active set (several active adapters stack: ``out = base + Σ deltas``).
    """
    from .configs import MethodConfig

    if isinstance(method, MethodConfig):
        method, given = method.adapt_arguments()
        targets = given.pop("targets", None) if targets is None else targets
        bits = given.pop("bits", None) if bits is None else bits
        given.pop("targets", None)
        given.pop("bits", None)
        options = {**given, **options}
    elif not isinstance(method, str):
        raise ConfigError(
            f"method must be a method name such as 'lora' or a config such as paretune.LoraConfig(r=8), "
            f"not {type(method).__name__}."
        )
    spec = registry.get(method)
    config = spec.config_cls.from_dict(options)
    _warn_zero_alpha(spec.name, config)
    if bits is not None:
        quant.check_bits(bits)
    if not isinstance(name, str) or not name or "." in name:
        raise ParetuneError(f"adapter name {name!r} is invalid: use a non-empty string without dots.")
    st = state_of(model, create=True)
    if name in st.adapters:
        raise ParetuneError(
            f"this model already has an adapter named {name!r}; pass another name=, or delete it with "
            f"paretune.remove(model, {name!r}) first."
        )
    names = match_targets(model, spec.targets_for(model, targets, config), spec.kinds, spec.name)
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in trainable:
        p.requires_grad_(False)
    built: list[tuple[Host, nn.Module]] = []
    try:
        targets_hosts = [wrap(model, module_name, st) for module_name in names]
        _check_rank(spec.name, config, targets_hosts)
        _refuse_shift_on_quantized(spec, targets_hosts)
        bank = spec.delta_cls.make_bank([h.geometry for h in targets_hosts], config)
        layers = bar(targets_hosts, desc=f"adapt {spec.name}", unit="layer", leave=False, delay=2.0)
        for layer, host in enumerate(layers):
            delta = spec.delta_cls(host.geometry, config, bank=bank, layer=layer)
            delta.train(host.base.training)  # a model in eval mode gets its adapter in eval mode (no dropout)
            built.append((host, delta))
            host.add(name, delta)
        if bits is not None:
            _quantize(spec.name, [d for _, d in built], bits)
        layers.close()
    except Exception:
        for host, delta in built:  # leave the model as it was
            delta.restore_base()
            del host.deltas[name]
        for module_name in names:
            if isinstance(h := model.get_submodule(module_name), Host) and len(h.deltas) == 0:
                unwrap(model, module_name)
        if not st.adapters:
            drop_state(model)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    st.adapters[name] = AdapterRecord(name, spec.name, config, names, bits)
    st.set_active([*st.active, name])
    _reroute(model)
    return model


#: methods outside the LoRA config family whose ``r`` is the rank of each layer's own trained
#: factors (LaMDA's B·S·A; Hydra's U·D in each branch). Not VeRA: its r is the size of frozen random
#: matrices shared by all layers, where an r above a layer's side is how the method is used (the
#: trained vectors stay small).
RANK_BOUNDED = ("lamda", "hydra")


def _low_rank(config) -> bool:
    """A config whose ``r`` bounds the rank of each layer's update (LoRA-shaped or RANK_BOUNDED)."""
    from .methods.lora import LowRankConfig

    return isinstance(config, LowRankConfig) or getattr(config, "method", None) in RANK_BOUNDED


def _check_rank(method: str, config, hosts_: list[Host]) -> None:
    """A low-rank method's r above min(d_out, d_in) of every targeted layer is refused; above that
    of some layers only, warned about (see adapt)."""
    if not _low_rank(config) or not hosts_:
        return
    narrow = []
    for host in hosts_:
        g = host.geometry
        side = min(g.d_out, g.d_in)
        if config.r > side:
            narrow.append(f"{g.name or type(host.base).__name__} ({g.d_out}×{g.d_in})")
    if not narrow:
        return
    widest = max(min(h.geometry.d_out, h.geometry.d_in) for h in hosts_)
    if len(narrow) == len(hosts_):
        raise ConfigError(
            f"{method}: r={config.r} exceeds min(d_out, d_in) of every targeted layer (at most {widest}; e.g. "
            f"{narrow[0]}); B·A cannot have a rank above that, so the extra parameters would add nothing. "
            f"Use r <= {widest}."
        )
    shown = ", ".join(narrow[:3]) + (f" and {len(narrow) - 3} more" if len(narrow) > 3 else "")
    warnings.warn(
        f"{method}: r={config.r} exceeds min(d_out, d_in) of {len(narrow)} of the {len(hosts_)} targeted layers "
        f"({shown}); on those B·A has a lower rank than r and part of their parameters add nothing.",
        UserWarning, stacklevel=4,
    )


def _warn_zero_alpha(method: str, config) -> None:
    if getattr(config, "alpha", None) == 0:
        warnings.warn(
            f"{method}: alpha=0 makes the scaling alpha/r zero, so this adapter will not change the model's "
            "output (and its B receives no gradient); use alpha > 0 (alpha = r or 2·r is usual).",
            UserWarning, stacklevel=3,
        )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7325`` (PEFT's line).

    Counts come from :func:`paretune.count`: trainable = the adapters' parameters plus any other
    parameter that requires grad (a classification head being trained); all = the base's
    parameters (a quantised layer's weight counted as its in·out numbers, as ``count`` does) plus
    the adapters'. Works on a model without adapters too.
    """
    from .core.accounting import count

    c = count(model)
    adapter_ids = set()
    if has_state(model):
        for _, host in hosts(model):
            for delta in host.deltas.values():
                adapter_ids.update(id(p) for p in delta.parameters())
    extra = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids)
    trainable = c["trainable"] + extra
    total = c["base"] + c["trainable"]
    percent = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


def _refuse_shift_on_quantized(spec, hosts_: list[Host]) -> None:
    """A method that moves part of W into itself when built (PiSSA's residual) cannot do so on a
    quantised base layer, which could not hold the residual exactly in its k bits."""
    if not spec.delta_cls.shifts_base:
        return
    for host in hosts_:
        if isinstance(host.geometry, QuantizedLinearGeometry):
            raise TargetError(
                f"{spec.name} changes the base weight when it is built, which the quantised layer "
                f"{host.geometry.name or 'a QuantizedLinear'} cannot hold exactly; use lora on the quantised model "
                "(QLoRA), or build this adapter on the float model and quantise afterwards.")


def _quantize(method: str, deltas: list[nn.Module], bits: int) -> None:
    """Make every delta's weight tensors k-bit (refused for a method with none, or whose file
    holds more than its parameters)."""
    for delta in deltas:
        quant.check_quantizable(delta, method)
    if not any(quant.quantizable(d) for d in deltas):
        raise ParetuneError(
            f"bits={bits}: {method} has no weight tensor (two or more dimensions) to quantise; k-bit adapters are "
            "for methods with weight matrices (LoRA's A and B, a bottleneck adapter's projections, ...)."
        )
    for delta in deltas:
        quant.quantize_delta(delta, bits)


def _reroute(model: nn.Module) -> None:
    """Work out every host's routing now, after a change of the active or merged set, so that the
    forward pass only reads it (a compiled model then sees no attribute change between calls)."""
    for _, host in hosts(model):
        host.route()


def adapters(model: nn.Module) -> dict[str, AdapterInfo]:
    """The model's adapters by name (method, config, targets, active, merged); {} for a plain model."""
    if not has_state(model):
        return {}
    st = state_of(model)
    return {n: st.info(n) for n in st.adapters}


def active(model: nn.Module) -> list[str]:
    """Names of the active adapters ([] for a plain model)."""
    return list(state_of(model).active) if has_state(model) else []


def set_active(model: nn.Module, names: str | Sequence[str], weights: Sequence[float] | None = None) -> nn.Module:
    """Make exactly ``names`` the active adapters (a name or a list; [] for the bare base).
    Trainability is unchanged: only active adapters take part in the forward pass.

    ``weights`` (one number per name) scales each adapter's change of every output it adapts:
    ``out = out + w·(adapter(x, out) − out)``, in order; ``[0.5, 0.5]`` averages two adapters, any
    weights give a weighted sum; without ``weights`` the adapters keep theirs. A merged adapter
    keeps weight 1; a method whose output is not "base output plus a change" (one that makes the
    sequence longer) cannot be weighted.
    :func:`per_sample` ignores the weights (each row runs its own adapter)."""
    names = [names] if isinstance(names, str) else list(names)
    st = state_of(model)
    for n in names:
        record_of(model, n)
    by_name = _check_weights(st, names, weights)
    off_but_merged = [n for n in st.merged if n not in names]
    if off_but_merged:
        raise ParetuneError(
            f"adapters {off_but_merged} are merged into the base weights and cannot be switched off; "
            "paretune.unmerge(model, name) them first."
        )
    st.set_active(names, by_name)
    _reroute(model)
    return model


def _check_weights(st, names: list[str], weights: Sequence[float] | None) -> dict[str, float] | None:
    """name -> weight, checked; None (keep the current weights) without ``weights``."""
    if weights is None:
        return None
    weights = list(weights)
    if len(weights) != len(names):
        raise ParetuneError(f"weights: give one number per adapter ({len(names)}), got {len(weights)}.")
    out = {}
    for n, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or w in (float("inf"), float("-inf")):
            raise ParetuneError(f"weights: {w!r} for adapter {n!r} is not a finite number.")
        if w != 1.0:
            if n in st.merged:
                raise ParetuneError(f"adapter {n!r} is merged into the base weights at weight 1; unmerge it before "
                                    f"giving it weight {w}.")
            if not registry.get(st.adapters[n].method).delta_cls.weightable:
                raise ParetuneError(f"adapter {n!r} ({st.adapters[n].method}) changes the shape of what it adapts, so its "
                                    "output is not the base output plus a change that a weight could scale; give it "
                                    "weight 1.")
        out[n] = float(w)
    return out


def _hosts_of(model: nn.Module, name: str) -> list[Host]:
    return [h for _, h in hosts(model) if name in h.deltas]


@torch.no_grad()
def merge(model: nn.Module, name: str = "default") -> nn.Module:
    """Fold adapter ``name`` into the base weights (W += ΔW, b += Δb). Outputs stay the same
    while the adapter is active; the forward pass then costs what the base costs."""
    record_of(model, name)
    st = state_of(model)
    if st.is_merged(name):
        raise ParetuneError(f"adapter {name!r} is already merged.")
    spec = registry.get(st.adapters[name].method)
    if not spec.delta_cls.mergeable:
        raise ParetuneError(f"{spec.name} is input-dependent and has no weight delta; it cannot be merged.")
    if name not in st.active:
        raise ParetuneError(f"adapter {name!r} is not active; set_active it before merging (merged means on).")
    if st.weight(name) != 1.0:
        raise ParetuneError(f"adapter {name!r} is active at weight {st.weight(name)}; merging folds in weight 1. "
                            "set_active it with weight 1 first.")
    with one_quantized_merge_warning(f"merging adapter {name!r} into"):
        for host in _hosts_of(model, name):
            host.merge(name)
    st.set_merged(name, True)
    _reroute(model)
    return model


@torch.no_grad()
def unmerge(model: nn.Module, name: str = "default") -> nn.Module:
    """Take a merged adapter back out of the base weights (W -= ΔW)."""
    record_of(model, name)
    st = state_of(model)
    if not st.is_merged(name):
        raise ParetuneError(f"adapter {name!r} is not merged.")
    for host in _hosts_of(model, name):
        merged = host.merged
        later = list(merged[merged.index(name) + 1:])
        if later and any(host.deltas[n].depends_on_base for n in [name, *later]):
            raise ParetuneError(
                f"adapter {name!r} was merged before {later}, and one of them changes W as a function of W "
                f"(e.g. Hydra); unmerge {later[::-1]} first (last merged, first out)."
            )
    with one_quantized_merge_warning(f"unmerging adapter {name!r} from"):
        for host in _hosts_of(model, name):
            host.unmerge(name, last=host.merged == (name,))
    st.set_merged(name, False)
    _reroute(model)
    return model


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the plain model. Merged adapters stay in the weights;
    unmerged ones are dropped (and a base changed at init, as by PiSSA, is restored)."""
    st = state_of(model)
    for module_name, host in list(hosts(model)):
        merged = host.merged
        for n, delta in reversed(list(host.deltas.items())):
            if n not in merged:
                delta.restore_base()
        unwrap(model, module_name)
    drop_state(model)
    del st
    return model


@torch.no_grad()
def remove(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name`` (unmerged: a base changed at init is restored; merged: it is
    taken out of the weights first). Hosts left with no adapter are unwrapped."""
    record_of(model, name)
    st = state_of(model)
    if st.is_merged(name):
        unmerge(model, name)
    for module_name, host in list(hosts(model)):
        if name in host.deltas:
            host.deltas[name].restore_base()
            del host.deltas[name]
            if len(host.deltas) == 0:
                unwrap(model, module_name)
    del st.adapters[name]
    st.set_active([n for n in st.active if n != name])
    _reroute(model)
    if not st.adapters:
        drop_state(model)
    return model


@contextlib.contextmanager
def per_sample(model: nn.Module, names_per_sample: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch uses adapter ``names_per_sample[i]`` (``None``:
    the bare base), whatever the active set; rows with the same adapter are computed together.

    >>> with paretune.per_sample(model, ["fr", "de", None, "fr"]):
    ...     logits = model(input_ids).logits
    """
    st = state_of(model)
    names = list(names_per_sample)
    if not names:
        raise ParetuneError("per_sample needs one adapter name (or None) per batch row; got an empty list.")
    for n in set(names) - {None}:
        record_of(model, n)
    merged = list(st.merged)
    if merged:
        raise ParetuneError(f"per_sample needs unmerged adapters; unmerge {merged} first.")
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    plan = [(n, torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items() if n is not None]
    all_hosts = [h for _, h in hosts(model)]
    for h in all_hosts:
        h.plan = SamplePlan(h, plan, len(names))
    try:
        yield model
    finally:
        for h in all_hosts:
            h.plan = None
