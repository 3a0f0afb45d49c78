"""Accounting: trainable parameters, stored bytes and base size of a model's adapters."""

from __future__ import annotations

from torch import nn

from . import quant
from .inject import hosts
from .state import has_state, record_of, state_of


def count(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """Cost of adapter ``name`` (or of all adapters with ``None``).

    Returns ``trainable`` (numbers the adapter trains: its parameters), ``stored_bytes`` (bytes of
    the tensors :func:`paretune.save` writes, without the small JSON), ``base`` (parameters of the
    model that belong to no adapter, a quantised layer's weight counted as its in·out numbers),
    ``base_bytes`` (their bytes as held: packed codes and scales for a quantised layer) and ``formula`` (the trainable count by the paper's formula,
    summed over the adapted layers, plus what the adapter shares across them; equal to ``trainable`` for a faithful method).
    An adapter that grows during training (IncreLoRA) is counted as it stands, and ``max_trainable``
    (present only then) is the most it can reach: its budget.
    """
    from . import registry

    if name is None and not has_state(model):  # no adapter yet: the base's size alone
        names: list[str] = []
    else:
        names = list(state_of(model).adapters) if name is None else [record_of(model, name).name]
    adapter_params: set[int] = set()
    trainable = stored = formula = 0
    shapes: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    geometries: dict[str, list] = {n: [] for n in names}
    for _, host in hosts(model):
        for n in names:
            if n not in host.deltas:
                continue
            delta = host.deltas[n]
            for p in delta.parameters():
                if id(p) not in adapter_params:
                    adapter_params.add(id(p))
                    trainable += p.numel()
            files = quant.file_tensors(delta, state_of(model).adapters[n].bits)
            stored += sum(t.numel() * t.element_size() for t in files.values())
            formula += delta.formula_now()
            shapes[n].append((delta.d_out, delta.d_in))
            geometries[n].append(delta.geometry)
    most = None
    for n in names:  # what an adapter shares across its layers, once
        record = state_of(model).adapters[n]
        cls = registry.get(record.method).delta_cls
        formula += cls.shared_formula(shapes[n], record.config)
        grows = cls.most_trainable(geometries[n], record.config)
        if grows is not None:
            most = (most or 0) + grows
    all_adapter = {id(p) for _, h in hosts(model) for p in h.deltas.parameters()}
    base = sum(p.numel() for p in model.parameters() if id(p) not in all_adapter)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in all_adapter)
    for m in model.modules():  # a quantised base layer keeps its weight packed in buffers
        if getattr(type(m), "quantized_matrix", False):
            base += m.in_features * m.out_features
            bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            base_bytes += m.stored_bytes() - bias
    out = {"trainable": trainable, "stored_bytes": stored, "base": base, "base_bytes": base_bytes, "formula": formula}
    if most is not None:
        out["max_trainable"] = most
    return out
