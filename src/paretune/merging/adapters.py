"""Merge several adapters of one base model into one LoRA adapter.

Every input adapter must be mergeable (it has a dense weight change ΔW; input-dependent methods
such as prefix tuning or a bottleneck adapter have none). Its task vector on a layer is that ΔW
(the change :func:`paretune.merge` would add to the weight, taken from the engine's
``Delta.delta_weight``), in the layer's (d_out, d_in) matrix view; a layer that only some of the
adapters touch counts ΔW = 0 for the others. Per layer

    ΔW_m = lam · METHODS[method]([ΔW_1, ..., ΔW_n], weights=weights, **params)

with the functions of :mod:`paretune.merging.methods` (task arithmetic: Ilharco et al. 2023;
TIES: Yadav et al. 2023; DARE: Yu et al. 2024; PCB: Du et al. 2024). The result becomes a new
LoRA adapter (Hu et al. 2021) by truncated SVD, the best rank-r approximation in the Frobenius
norm (Eckart and Young 1936): ΔW_m = U S Vᵀ, B = U_r·diag(sqrt(S_r)), A = diag(sqrt(S_r))·V_rᵀ,
and alpha = r so that LoRA's scaling alpha/r is 1 and ΔW = B·A.

Choices where the papers are silent:

* ``rank=None`` (exact): one LoRA adapter has one rank for all its layers, so r is the largest
  numerical rank over the layers (singular values above σ_max · max(d_out, d_in) · eps of the task
  vectors' dtype, the rule of ``numpy.linalg.matrix_rank``); each layer keeps its triplets above
  that threshold, and a layer of lower rank gets zero columns in B and zero rows in A, which
  change nothing. A method that sparsifies (TIES, DARE, PCB) usually gives full-rank ΔW_m, so
  exact then means r = the largest min(d_out, d_in) among the layers.
* a given ``rank`` larger than a layer's min(d_out, d_in) keeps all of that layer's singular
  triplets and pads with zeros likewise;
* SVDs run in float64 on the weights' device; A and B are stored in the adapter's usual precision
  (float32 for a float32 or half-precision base), and the reported errors are measured on the
  stored factors;
* a relative error of a layer whose ΔW_m is zero is reported as 0;
* ``seed=`` for DARE: one ``torch.Generator`` seeded once draws the masks of all layers in model
  order (the same seed on every layer would drop the same positions of every equally shaped
  layer); pass ``generator=`` to use your own;
* an adapter that moved part of the base weight into itself at creation (PiSSA keeps the
  residual in the base) has ΔW measured against the original weight: its delta_weight minus the
  part it moved, read off its ``unshift`` map;
* LoRA has no bias. When an input changes biases (IA3 on a layer with a bias, BitFit), ``bias``
  decides: ``"error"`` (default) refuses and names the layers, ``"drop"`` warns and keeps the
  weights' merge only, ``"bitfit"`` merges the bias changes with the same method and keeps them
  in a second adapter, a BitFit adapter named ``<out_name>_bias`` (add_missing=True), active with
  the LoRA one.

After the merge the new adapter (and its bias adapter) is the model's only active adapter; the
inputs stay on the model, unchanged, except those loaded here from folders, which are removed
again. On any error the model is left as it was.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError, ParetuneError

AdapterRef = Union[str, "os.PathLike[str]"]
LORA_KINDS = ("linear", "conv1d", "embedding", "conv2d")
BIAS_MODES = ("error", "drop", "bitfit")


def merge_adapters(
    model: nn.Module,
    names: Sequence[AdapterRef],
    *,
    method: str,
    out_name: str = "merged",
    rank: int | None = None,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    bias: str = "error",
    progress: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Merge the adapters ``names`` of ``model`` into one new LoRA adapter ``out_name``.

    ``names``: adapter names on the model, or folders written by :func:`paretune.save` (loaded
    onto the model for the merge and removed afterwards; their base must be this model's).
    ``method``: a key of :data:`paretune.merging.methods.METHODS` (task_arithmetic,
    weighted_average, ties, dare_linear, dare_ties, pcb); ``params`` go to it (density, ratio,
    majority_sign, seed, ...); ``weights`` one number per adapter. ``lam`` scales the merged task
    vector. ``rank``: the LoRA rank (truncated SVD); None: exact (see the module docstring).
    ``bias``: "error", "drop" or "bitfit", for inputs that change biases.

    Returns a report: ``layers`` (per layer: shape, numerical rank of ΔW_m, singular triplets
    kept, ‖ΔW_m‖_F and the relative error ‖ΔW_m − B·A‖_F / ‖ΔW_m‖_F), ``rel_error`` over all
    layers (sqrt of the summed squared errors over sqrt of the summed squared norms),
    ``max_rel_error``, ``rank``, ``trainable`` (the LoRA adapter's parameters), ``bias`` and
    ``seconds``.
    """
    from .. import api
    from ..core.inject import hosts
    from ..core.state import has_state, state_of

    t0 = time.perf_counter()
    fn = _method_fn(method)
    rank = _check_rank(rank)
    lam = _check_number(lam, "lam")
    if bias not in BIAS_MODES:
        raise ConfigError(f"bias={bias!r} is not understood; choose one of {', '.join(map(repr, BIAS_MODES))}.")
    if isinstance(names, (str, os.PathLike)) or not isinstance(names, Sequence) or len(names) == 0:
        raise ConfigError("names: give a non-empty list of adapter names or adapter folders, e.g. ['fr', 'de'].")
    if weights is not None:
        weights = [_check_number(w, "weights") for w in weights]
        if len(weights) != len(names):
            raise ConfigError(f"weights: give one number per adapter ({len(names)}), got {len(weights)}.")
    call_params = _method_params(fn, method, params)
    if not isinstance(out_name, str) or not out_name or "." in out_name:
        raise ParetuneError(f"out_name {out_name!r} is invalid: use a non-empty string without dots.")
    existing = dict(state_of(model).adapters) if has_state(model) else {}
    bias_name = f"{out_name}_bias"
    for taken in (out_name, bias_name if bias == "bitfit" else None):
        if taken is not None and taken in existing:
            raise ParetuneError(f"this model already has an adapter named {taken!r}; pass another out_name=, or "
                                f"paretune.remove(model, {taken!r}) first.")

    was_active = list(state_of(model).active) if has_state(model) else []
    was_weights = {n: state_of(model).weight(n) for n in was_active} if was_active else {}
    grad = {id(p): p.requires_grad for p in model.parameters()}
    loaded = _load_folders(model, names, existing, out_name)
    made: list[str] = []
    try:
        inputs = [loaded.get(i, n) for i, n in enumerate(names)]
        _check_inputs(model, inputs, out_name)
        st = state_of(model)
        layer_hosts = [(n, h) for n, h in hosts(model) if any(a in h.deltas for a in inputs)]
        _check_layers(layer_hosts, inputs, st)

        gen_factory = _generator_factory(fn, call_params)
        layers: dict[str, dict[str, Any]] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        merged_w: dict[str, torch.Tensor] = {}
        bias_changes: dict[str, torch.Tensor] = {}
        bar = _bar(len(layer_hosts), progress, f"merge {method}")
        for layer_name, host in layer_hosts:
            tvs, dbs = _task_vectors(host, inputs)
            kw = dict(call_params)
            if gen_factory is not None:
                kw["generator"] = gen_factory(tvs[0].device)
            dw = lam * fn(tvs, weights=weights, **kw)
            if any(db is not None for db in dbs):
                ref = next(db for db in dbs if db is not None)
                full = [db if db is not None else torch.zeros_like(ref) for db in dbs]
                kw_b = dict(kw)
                db_m = lam * fn(full, weights=weights, **kw_b)
                if bool((db_m != 0).any()) or any(bool((b != 0).any()) for b in full):
                    bias_changes[layer_name] = db_m
            u, s, vh = torch.linalg.svd(dw.to(torch.float64), full_matrices=False)
            eps = torch.finfo(dw.dtype).eps
            tol = (float(s[0]) if s.numel() else 0.0) * max(dw.shape) * eps
            num_rank = int((s > tol).sum()) if s.numel() and float(s[0]) > 0 else 0
            cut = num_rank if rank is None else min(rank, s.numel())  # only the triplets the adapter can keep
            factors[layer_name] = (u[:, :cut].clone(), s[:cut].clone(), vh[:cut].clone())
            del u, s, vh
            merged_w[layer_name] = dw
            layers[layer_name] = {"shape": list(dw.shape), "numerical_rank": num_rank}
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

        if bias_changes and bias == "error":
            shown = ", ".join(list(bias_changes)[:5]) + (f", ... ({len(bias_changes) - 5} more)"
                                                         if len(bias_changes) > 5 else "")
            raise ParetuneError(
                f"the adapters change biases ({shown}), which a LoRA adapter cannot hold. Pass bias='bitfit' to keep "
                "the merged bias changes in a second (BitFit) adapter, or bias='drop' to leave them out."
            )
        if bias_changes and bias == "drop":
            warnings.warn(f"merge_adapters: bias changes of {len(bias_changes)} layers dropped (bias='drop'); the "
                          "merged adapter holds the weight changes only.", stacklevel=2)

        r = rank if rank is not None else max([1, *(v["numerical_rank"] for v in layers.values())])
        exact_names = "|".join(re.escape(n) for n, _ in layer_hosts)
        api.adapt(model, "lora", name=out_name, targets=exact_names, r=r, alpha=float(r))
        made.append(out_name)
        sum_err2 = sum_norm2 = 0.0
        worst = 0.0
        for layer_name, host in layer_hosts:
            u, s, vh = factors.pop(layer_name)
            delta = host.deltas[out_name]
            keep = min(r, s.numel())
            root = torch.sqrt(s[:keep])
            with torch.no_grad():
                delta.A.zero_()
                delta.B.zero_()
                delta.A[:keep].copy_((root[:, None] * vh[:keep]).to(delta.A.dtype))
                delta.B[:, :keep].copy_((u[:, :keep] * root[None, :]).to(delta.B.dtype))
                target = merged_w.pop(layer_name).to(torch.float64)
                err = float(torch.linalg.matrix_norm(target - delta.delta_weight().to(torch.float64)))
                norm = float(torch.linalg.matrix_norm(target))
            rel = err / norm if norm > 0 else 0.0
            layers[layer_name].update(kept_rank=keep, norm=norm, rel_error=rel)
            sum_err2 += err * err
            sum_norm2 += norm * norm
            worst = max(worst, rel)

        bias_report: dict[str, Any] = {"layers": list(bias_changes), "kept_as": None}
        if bias_changes:
            if bias == "bitfit":
                api.adapt(model, "bitfit", name=bias_name, targets="|".join(re.escape(n) for n in bias_changes),
                          add_missing=True)
                made.append(bias_name)
                for layer_name, db in bias_changes.items():
                    d = model.get_submodule(layer_name).deltas[bias_name]
                    with torch.no_grad():
                        d.bias.copy_(db.to(d.bias.dtype))
                bias_report["kept_as"] = bias_name
            else:
                bias_report["kept_as"] = "dropped"
        for p in model.parameters():  # as paretune.load leaves them: the new adapters frozen, the rest as it was
            p.requires_grad_(grad.get(id(p), False))
        api.set_active(model, made)
    except BaseException:
        for n in reversed(made):
            api.remove(model, n)
        _restore(model, loaded, was_active, was_weights)
        for p in model.parameters():
            p.requires_grad_(grad.get(id(p), p.requires_grad))
        raise
    for n in loaded.values():
        api.remove(model, n)
    lora_params = sum(p.numel() for p in _adapter_params(model, out_name))
    return {
        "method": method,
        "params": {k: v for k, v in params.items() if k != "generator"},
        "weights": list(weights) if weights is not None else None,
        "lam": lam,
        "adapters": [os.fspath(n) for n in names],
        "out_name": out_name,
        "rank": r,
        "exact": rank is None,
        "layers": layers,
        "rel_error": math.sqrt(sum_err2) / math.sqrt(sum_norm2) if sum_norm2 > 0 else 0.0,
        "max_rel_error": worst,
        "trainable": lora_params,
        "bias": bias_report,
        "seconds": time.perf_counter() - t0,
    }


# -- checks --------------------------------------------------------------------------------------

def _method_fn(method: str):
    from .methods import METHODS

    if not isinstance(method, str) or method not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown merge method {method!r}.{hint} Known: {', '.join(METHODS)}.")
    return METHODS[method]


def _check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r}: give an integer >= 1 (the merged LoRA's rank), or None for an exact merge.")
    return rank


def _check_number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{what}: {v!r} is not a finite number.")
    return float(v)


def _method_params(fn, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against the method's keyword arguments (all but the task vectors and
    ``weights``)."""
    sig = inspect.signature(fn)
    accepted = [n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and n != "weights"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"merge method {method!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                          f"{', '.join(accepted) or 'none'} (plus weights=, lam=, rank=).")
    missing = [n for n in accepted if sig.parameters[n].default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ConfigError(f"merge method {method!r} needs {', '.join(f'{n}=' for n in missing)}: pass it to "
                          "merge_adapters (e.g. density=0.5).")
    return dict(params)


def _generator_factory(fn, params: dict[str, Any]):
    """For a method that draws at random: with ``seed=`` (and no ``generator=``), one generator
    seeded once serves every layer in turn (see the module docstring); None otherwise."""
    if "generator" not in inspect.signature(fn).parameters:
        return None
    seed = params.get("seed")
    if seed is None or params.get("generator") is not None:
        return None
    del params["seed"]
    gens: dict[str, torch.Generator] = {}

    def get(device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in gens:
            gens[key] = torch.Generator(device=device).manual_seed(int(seed))
        return gens[key]

    return get


def _is_folder_ref(ref: Any, existing: dict) -> bool:
    if isinstance(ref, os.PathLike):
        return True
    return isinstance(ref, str) and ref not in existing and Path(ref).is_dir()


def _load_folders(model: nn.Module, names: Sequence[AdapterRef], existing: dict, out_name: str) -> dict[int, str]:
    """Load every folder among ``names`` under a fresh adapter name; {index: name}. All folders are
    checked (description, base fingerprint, mergeable method) before any is loaded."""
    from ..core import registry
    from ..io import check_fingerprint, load, read_meta

    refs = {i: ref for i, ref in enumerate(names) if _is_folder_ref(ref, existing)}
    for i, ref in enumerate(names):
        if i not in refs and not (isinstance(ref, str) and ref in existing):
            if not isinstance(ref, str):
                raise ConfigError(f"names[{i}]: {ref!r} is neither an adapter name nor an adapter folder.")
            raise ParetuneError(f"no adapter named {ref!r} on this model (it has: "
                                f"{', '.join(map(repr, existing)) or 'none'}), and no adapter folder at that path.")
    for i, ref in refs.items():
        meta = read_meta(ref)
        check_fingerprint(model, meta, ref)
        spec = registry.get(meta["method"])
        if not spec.delta_cls.mergeable:
            raise ConfigError(_not_mergeable(os.fspath(ref), spec.name))
    loaded: dict[int, str] = {}
    taken = set(existing) | {out_name}
    try:
        for i, ref in refs.items():
            k, name = i, f"merge_input_{i}"
            while name in taken:
                k += len(names)
                name = f"merge_input_{k}"
            taken.add(name)
            load(model, ref, name=name)
            loaded[i] = name
    except BaseException:
        from .. import api

        for n in loaded.values():
            api.remove(model, n)
        raise
    return loaded


def _not_mergeable(what: str, method: str) -> str:
    return (f"adapter {what!r} is {method}, which has no weight change to merge (its effect depends on the input); "
            "merge_adapters takes mergeable adapters only (LoRA and its kin, IA3, LoKr, BitFit, ...).")


def _check_inputs(model: nn.Module, inputs: list[str], out_name: str) -> None:
    from ..core import registry
    from ..core.state import record_of, state_of

    if len(set(inputs)) != len(inputs):
        dup = sorted({n for n in inputs if inputs.count(n) > 1})
        raise ConfigError(f"names: {dup} given more than once; give each adapter once (weights= weighs them).")
    st = state_of(model)
    for n in inputs:
        rec = record_of(model, n)
        if not registry.get(rec.method).delta_cls.mergeable:
            raise ConfigError(_not_mergeable(n, rec.method))
        if st.is_merged(n):
            raise ParetuneError(f"adapter {n!r} is merged into the base weights; paretune.unmerge(model, {n!r}) "
                                "before merging it with others.")


def _check_layers(layer_hosts: list, inputs: list[str], st) -> None:
    for name, host in layer_hosts:
        if host.kind not in LORA_KINDS:
            users = [n for n in inputs if n in host.deltas]
            raise ConfigError(f"layer {name} is a {host.kind} layer (adapted by {users}); the merged LoRA adapter "
                              f"can only hold {', '.join(LORA_KINDS)} layers. Merge adapters that leave it out.")
        if host.merged:
            raise ParetuneError(f"layer {name} has adapters merged into its weight ({list(host.merged)}); the task "
                                "vectors are changes of the original base, so unmerge them first.")
        if host.kind == "conv2d":
            shifting = [n for n in inputs if n in host.deltas and host.deltas[n].shifts_base]
            if shifting:
                raise ConfigError(f"layer {name}: {shifting} changed the base weight of a Conv2d at creation, whose "
                                  "change cannot be read back here; leave that adapter out.")


# -- task vectors --------------------------------------------------------------------------------

def _task_vectors(host, inputs: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """(ΔW_i, Δb_i) of every input on this layer, in one dtype (float32 or float64) and device;
    zeros for an input that does not adapt the layer."""
    d_out, d_in = host.geometry.d_out, host.geometry.d_in
    got: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with torch.no_grad():
        for n in inputs:
            if n in host.deltas:
                delta = host.deltas[n]
                dw = delta.delta_weight().detach()
                if delta.shifts_base:
                    dw = dw - _shift_of(delta).to(dw.dtype)
                db = delta.delta_bias()
                got[n] = (dw, None if db is None else db.detach())
    ref = next(iter(got.values()))[0]
    dtype = ref.dtype
    for dw, _ in got.values():
        dtype = torch.promote_types(dtype, dw.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    tvs, dbs = [], []
    for n in inputs:
        if n in got:
            dw, db = got[n]
            if tuple(dw.shape) != (d_out, d_in):
                raise ParetuneError(f"adapter {n!r}: ΔW of shape {tuple(dw.shape)} on a ({d_out}, {d_in}) layer; the "
                                    "adapter does not fit this base.")
            tvs.append(dw.to(ref.device, dtype))
            dbs.append(None if db is None else db.to(ref.device, dtype))
        else:
            tvs.append(torch.zeros(d_out, d_in, dtype=dtype, device=ref.device))
            dbs.append(None)
    return tvs, dbs


def _shift_of(delta) -> torch.Tensor:
    """The (d_out, d_in) matrix a base-shifting delta moved out of the base weight, read off its
    ``unshift`` map (linear in the input): applied to the identity (one-hot ids for an embedding)."""
    w = delta.geometry.weight
    if delta.kind == "embedding":
        x = torch.arange(delta.d_in, device=w.device)
    else:
        x = torch.eye(delta.d_in, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    return delta.unshift(x).T


# -- helpers -------------------------------------------------------------------------------------

def _adapter_params(model: nn.Module, name: str) -> list[nn.Parameter]:
    from ..core.inject import hosts

    return [p for _, h in hosts(model) if name in h.deltas for p in h.deltas[name].parameters()]


def _restore(model: nn.Module, loaded: dict[int, str], was_active: list[str], was_weights: dict[str, float]) -> None:
    """Take the folders' adapters off again and give back the active set (after an error)."""
    from .. import api
    from ..core.state import has_state

    for n in loaded.values():
        api.remove(model, n)
    if has_state(model):
        api.set_active(model, was_active, [was_weights.get(n, 1.0) for n in was_active] if was_active else None)


def _bar(total: int, progress: bool, desc: str):
    if not progress:
        return None
    from ..progress import bar as progress_bar

    return progress_bar(total=total, desc=desc, unit="layer", leave=False)
