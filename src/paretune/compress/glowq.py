"""GlowQ: a low-rank correction of the quantisation error, with one right factor shared by the
layers that read the same input.

Paper: An, Suh and Kim, "GlowQ: Group-Shared LOw-Rank Approximation for Quantized LLMs"
(ICLR 2026, arXiv:2603.25385).

Groups
------
An *input-sharing group* is a set of linear layers that read the same input tensor: a Llama
block's ``q_proj`` / ``k_proj`` / ``v_proj`` (the attention's normalised hidden state), its
``gate_proj`` / ``up_proj``; BERT's ``query`` / ``key`` / ``value``. A layer that shares its input
with no other (``o_proj``, ``down_proj``, GPT-2's fused ``c_attn``) is a group of its own. The
groups are found, not listed per architecture: :func:`glowq` runs one forward pass (``example``, or
a few dummy token ids) with a pre-hook on every targeted layer, and layers whose first call
receives the very same tensor object form a group.

The correction
--------------
Each targeted layer ``W_i`` (d_out_i × d_in) is quantised by round-to-nearest
(:class:`~paretune.compress.quantized.QuantizedLinear`, the scheme of :mod:`paretune.compress.quantized`),
and a group of layers ``i = 1..n`` gets one right factor ``R`` (r × d_in) and a left factor ``L_i``
(d_out_i × r) per layer:

    y_i = Q(W_i) x + L_i (R x).

``R x`` is computed once per group per forward and reused by every member (below).

Initialisation (computed in float64 from the float weights, before they are replaced): stack the
members' quantisation errors row-wise, ``E = [W_1 − Q(W_1); …; W_n − Q(W_n)]``
(Σ d_out_i × d_in), take its SVD ``E = U S Vᵀ`` and set

    R = V_rᵀ (orthonormal rows),   [L_1; …; L_n] = (U S)_r   (L_i: the rows of module i),

so ``[L_1; …; L_n] R = U_r S_r V_rᵀ``, the best rank-r approximation of ``E`` in the Frobenius norm
(Eckart–Young): ``‖E − L R‖_F² = Σ_{i>r} σ_i²``. All the singular values go to the left factors
(a split the paper does not fix; it keeps ``R`` an orthonormal projection shared by the group, and
``L = E Rᵀ`` is then the least-squares left factor for that ``R``). The factors are float
``nn.Parameter`` s in the model's dtype and can be trained afterwards (:func:`glowq_parameters`).

The paper fits the factors to a covariance-weighted error ``‖Σ^{1/2}(E − L R)‖_F`` from calibration
activations, solved by a QR-reduced randomized SVD; this module uses the data-free objective
(``Σ = I``) and an exact SVD, so no calibration data is needed.

Selection (GlowQ-S)
-------------------
``select=f`` keeps the correction on the ``ceil(f · n)`` of the ``n`` groups that score highest and
leaves the others plainly quantised. The score is the squared error the correction removes per
parameter it stores,

    (‖E‖_F² − ‖E − L R‖_F²) / (r · (d_in + Σ d_out_i)) = Σ_{i≤r} σ_i² / (r · (d_in + Σ d_out_i)),

our choice: the paper's selective variant ranks groups by the energy its factors capture
(``‖L‖_F²``, which equals the numerator here since ``R`` has orthonormal rows) and by their
normalised error; dividing by the stored parameters makes groups of different sizes comparable.

Sharing ``R x``
---------------
The members of a group are :class:`GlowQLinear` layers that stand where the Linear layers stood;
each holds its QuantizedLinear and ``L_i`` and refers to one shared :class:`GlowQGroup`, which holds
``R``. The group keeps the last ``(input, R x)`` it computed: a member called with the very same
input tensor (same object, not modified in place since, ``R`` not updated since, same grad mode)
reuses ``R x``; any other input is projected afresh, so the result is always ``Q(W_i) x + L_i R x``.
The input is held by a weak reference (a cached result keeps no activation alive in inference).

Files
-----
:func:`save_glowq` writes ``glowq.json`` (bits, group size, axis, rank, the groups and their
members, the plainly quantised layers, the initial errors) and ``model.safetensors`` (the whole
state: packed codes, scales, zeros, biases, each ``R`` once, each ``L_i``, and the rest of the
model); :func:`load_glowq` rebuilds the structure on a fresh float model of the same
architecture and reads every tensor.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterFileError, ConfigError, ParetuneError
from .quantize import Targets, _is_linear, checked_layers, is_quantized
from .quantized import Axis, QuantizedLinear
from .state_folder import WEIGHTS, load_unique_state, read_state_meta, saved_linear, write_state_folder

FORMAT = "paretune-glowq"
VERSION = 1
META = "glowq.json"
DUMMY_TOKENS = 8


# -- modules --------------------------------------------------------------------------------------
class GlowQGroup(nn.Module):
    """The shared right factor ``R`` (r × d_in) of one input-sharing group.

    ``forward(x) = x Rᵀ`` (``R x`` per token); :meth:`project` returns it from the cache when called
    again with the same, unchanged input. ``members``: the names of the layers that share it.
    ``error_before`` / ``error_after``: ‖E‖_F / ‖W‖_F and ‖E − L R‖_F / ‖W‖_F of the stacked group
    at initialisation; ``score``: the selection score (module docstring)."""

    def __init__(self, in_features: int, rank: int, members: list[str], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.rank = in_features, rank
        self.members = list(members)
        self.right = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.error_before = self.error_after = self.score = float("nan")
        self._cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.right)

    def _state_key(self, x: torch.Tensor) -> tuple:
        return (x._version, self.right._version, torch.is_grad_enabled(), torch.is_autocast_enabled())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``R x``, computed once for a given input tensor and reused by the other members."""
        c = self._cache
        if c is not None and c[0]() is x and c[1] == self._state_key(x):
            return c[2]
        out = self(x)
        self._cache = (weakref.ref(x), self._state_key(x), out)
        return out

    def clear_cache(self) -> None:
        self._cache = None

    def __getstate__(self) -> dict:  # copy.deepcopy / pickling: the cache is not part of the state
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, members={len(self.members)}"


class GlowQLinear(nn.Module):
    """A quantised linear layer with its share of a group's correction:
    ``forward(x) = quant(x) + L (R x)`` with ``quant`` a :class:`QuantizedLinear` (bias included),
    ``left`` = ``L`` (out × r) and ``group`` the shared :class:`GlowQGroup` holding ``R``."""

    def __init__(self, quant: QuantizedLinear, group: GlowQGroup, left: torch.Tensor):
        super().__init__()
        if tuple(left.shape) != (quant.out_features, group.rank) or group.in_features != quant.in_features:
            raise ParetuneError(f"GlowQLinear: left factor {tuple(left.shape)} / right factor "
                                f"({group.rank}, {group.in_features}) do not fit a ({quant.out_features}, "
                                f"{quant.in_features}) layer.")
        self.quant = quant
        self.group = group
        self.left = nn.Parameter(left)

    @property
    def in_features(self) -> int:
        return self.quant.in_features

    @property
    def out_features(self) -> int:
        return self.quant.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x) + F.linear(self.group.project(x), self.left)

    def corrected_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q(W) + L R`` (out, in), the dense weight this layer applies."""
        w = self.quant.dequantized_weight(dtype)
        return w + (self.left.to(w.dtype) @ self.group.right.to(w.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.group.rank}"


# -- helpers --------------------------------------------------------------------------------------
def _weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or GPT-2 Conv1D (whose stored weight is (in, out))."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _groups_of(model: nn.Module) -> list[GlowQGroup]:
    seen: dict[int, GlowQGroup] = {}
    for m in model.modules():
        if isinstance(m, GlowQLinear):
            seen.setdefault(id(m.group), m.group)
    return list(seen.values())


def _plain_layers(model: nn.Module) -> list[str]:
    """Names of the QuantizedLinear layers that are not part of a GlowQLinear."""
    inner = {id(m.quant) for m in model.modules() if isinstance(m, GlowQLinear)}
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and id(m) not in inner]


def is_glowq(model: nn.Module) -> bool:
    """Whether ``model`` holds GlowQ-corrected layers."""
    return any(isinstance(m, GlowQLinear) for m in model.modules())


def _run_example(model: nn.Module, example: Any) -> None:
    if example is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            raise ConfigError("glowq: the model has no config.vocab_size to build dummy token ids from; pass "
                              "example= (a tensor of input ids or a dict of the model's inputs) for the forward "
                              "pass that finds the input-sharing groups.")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        ids = (torch.arange(1, DUMMY_TOKENS + 1, device=device) % vocab)[None]
        model(input_ids=ids)
    elif isinstance(example, torch.Tensor):
        model(example)
    elif isinstance(example, Mapping):
        model(**example)
    else:
        raise ConfigError(f"glowq: example must be None, a tensor of input ids or a dict of model inputs, not "
                          f"{type(example).__name__}.")


def find_groups(model: nn.Module, names: list[str], example: Any = None) -> list[list[str]]:
    """The input-sharing groups among the layers ``names``: one forward pass (``example``, or
    dummy token ids built from ``model.config.vocab_size``) with a pre-hook on each layer; layers
    whose first call receives the same tensor object form a group, in model order. A layer that
    is not called is a group of its own. The model is not changed."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, args, kwargs):
            if name not in seen:
                x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                if isinstance(x, torch.Tensor):
                    seen[name] = x
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            _run_example(model, example)
    except ParetuneError:
        raise
    except Exception as e:
        raise ConfigError(f"glowq: the forward pass that finds the input-sharing groups failed ({type(e).__name__}: "
                          f"{e}); pass example= with inputs the model accepts (a tensor of input ids or a dict "
                          "such as {'input_ids': ..., 'decoder_input_ids': ...}).") from None
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    index: dict[int, int] = {}
    for n in names:  # `seen` holds every tensor, so their ids are distinct
        x = seen.get(n)
        if x is None:
            groups.append([n])
            continue
        if id(x) in index:
            groups[index[id(x)]].append(n)
        else:
            index[id(x)] = len(groups)
            groups.append([n])
    return groups


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r} must be a positive integer (the rank of each group's correction, e.g. 16).")


def _check_select(select: float | None) -> None:
    if select is None:
        return
    if isinstance(select, bool) or not isinstance(select, (int, float)) or not (0 < float(select) <= 1):
        raise ConfigError(f"select={select!r} must be a fraction of the groups in (0, 1] (e.g. 0.5 keeps the "
                          "correction on the better-scoring half), or None to correct every group.")


def _keep_count(select: float | None, n: int) -> int:
    return n if select is None else max(1, math.ceil(float(select) * n - 1e-9))


# -- conversion -----------------------------------------------------------------------------------
@torch.no_grad()
def glowq(model: nn.Module, bits: int = 4, rank: int = 16, group_size: int | None = 128, axis: Axis = "out",
          targets: Targets = None, select: float | None = None, example: Any = None,
          progress: bool = True) -> nn.Module:
    """Quantise ``model``'s linear layers (RTN, as :func:`paretune.compress.quantize`) and add a
    GlowQ low-rank correction with one right factor per input-sharing group; in place, returns
    the model.

    ``bits``, ``group_size``, ``axis``, ``targets``: as for :func:`~paretune.compress.quantize`
    (the output head and embeddings are skipped). ``rank``: the rank r of every group's
    correction, at most ``min(d_in, Σ d_out_i)`` of each group. ``select``: None corrects every
    group; a fraction f in (0, 1] corrects the ``ceil(f·n)`` best-scoring groups (GlowQ-S; the
    others are only quantised). ``example``: inputs for the forward pass that finds the groups
    (a tensor of input ids or a dict of model inputs; default: a few dummy token ids).

    Every check runs, and every layer and factor is computed, before the first module is swapped
    in: on any error the model is left as it was. See the module docstring for the formulas."""
    _check_rank(rank)
    _check_select(select)
    names = checked_layers(model, "glowq", bits, group_size, axis, targets, None)
    groups = find_groups(model, names, example)
    too_big = []
    for members in groups:
        d_in = _weight(model.get_submodule(members[0])).shape[1]
        limit = min(d_in, sum(_weight(model.get_submodule(n)).shape[0] for n in members))
        if rank > limit:
            too_big.append(f"{'+'.join(members)} (at most {limit})")
    if too_big:
        raise ConfigError(f"glowq: rank={rank} exceeds min(d_in, Σ d_out) of {', '.join(too_big[:6])}"
                          f"{' ...' if len(too_big) > 6 else ''}; choose a smaller rank or leave those layers out "
                          "of targets.")

    from ..progress import bar as progress_bar

    built = []  # (members, [QuantizedLinear], R, [L_i], stats)
    for members in progress_bar(groups, desc=f"glowq {bits}-bit r={rank}", unit="group", enabled=progress, leave=False):
        modules = [model.get_submodule(n) for n in members]
        quants = []
        for n, m in zip(members, modules):
            try:
                q = QuantizedLinear.from_module(m, bits=bits, group_size=group_size, axis=axis)
            except ParetuneError as e:
                raise type(e)(f"glowq: {n}: {e}") from None
            q.train(m.training)
            quants.append(q)
        w = torch.cat([_weight(m).detach().double() for m in modules])
        e = w - torch.cat([q.dequantized_weight(torch.float64) for q in quants])
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        dtype, device = modules[0].weight.dtype, modules[0].weight.device
        right = vh[:rank].to(dtype).contiguous()
        lefts = list(torch.split((u[:, :rank] * s[:rank]).to(dtype), [q.out_features for q in quants]))
        approx = torch.cat(lefts).double() @ right.double()
        w_norm = float(torch.linalg.vector_norm(w)) or 1.0
        e_sq = float(torch.linalg.vector_norm(e)) ** 2
        after_sq = float(torch.linalg.vector_norm(e - approx)) ** 2
        stats = {"error_before": math.sqrt(e_sq) / w_norm, "error_after": math.sqrt(after_sq) / w_norm,
                 "score": (e_sq - after_sq) / (rank * (w.shape[1] + w.shape[0]))}
        built.append((members, quants, right.to(device), [l.contiguous().to(device) for l in lefts], stats))

    keep = _keep_count(select, len(built))
    order = sorted(range(len(built)), key=lambda i: -built[i][4]["score"])
    chosen = set(order[:keep])
    for i, (members, quants, right, lefts, stats) in enumerate(built):  # nothing above changed the model
        if i not in chosen:
            for n, q in zip(members, quants):
                _set(model, n, q)
            continue
        group = GlowQGroup(right.shape[1], rank, members, dtype=right.dtype, device=right.device)
        group.right.data.copy_(right)
        group.error_before, group.error_after, group.score = (stats["error_before"], stats["error_after"],
                                                              stats["score"])
        for n, q, left in zip(members, quants, lefts):
            _set(model, n, GlowQLinear(q, group, left))
    return model


# -- inspection -----------------------------------------------------------------------------------
def glowq_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The correction's factors (each group's ``R`` once, then every ``L_i``), e.g. to train only
    them: freeze the model, set ``requires_grad`` on these, and train."""
    out: list[nn.Parameter] = []
    for g in _groups_of(model):
        out.append(g.right)
    out += [m.left for m in model.modules() if isinstance(m, GlowQLinear)]
    return out


def glowq_report(model: nn.Module) -> dict:
    """The correction's size and effect: ``groups`` (corrected groups), ``plain_layers``
    (layers quantised without a correction), ``rank``, ``parameters`` and ``bytes`` of the factors
    (in their dtype), ``error_before`` / ``error_after``: the mean over corrected groups of
    ‖W − Q(W)‖_F / ‖W‖_F and ‖W − Q(W) − L R‖_F / ‖W‖_F of the stacked group at initialisation
    (the float weights are not kept, so training the factors afterwards does not update them),
    and ``per_group``: members and both errors of each group."""
    groups = _groups_of(model)
    params = glowq_parameters(model)
    plain = _plain_layers(model)
    per = [{"members": g.members, "error_before": g.error_before, "error_after": g.error_after} for g in groups]
    mean = (lambda k: sum(p[k] for p in per) / len(per)) if per else (lambda k: float("nan"))
    return {"groups": len(groups), "plain_layers": len(plain), "rank": groups[0].rank if groups else 0,
            "parameters": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "error_before": mean("error_before"), "error_after": mean("error_after"), "per_group": per}


# -- files ----------------------------------------------------------------------------------------
def save_glowq(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a GlowQ model to the folder ``path``: ``glowq.json`` (bits, group size, axis, rank,
    the groups with their members and initial errors, the plainly quantised layers, each layer's
    settings) and ``model.safetensors`` (the whole state, each shared tensor once: packed codes,
    scales, zeros, biases, each group's ``R`` once, every ``L_i``, and the rest of the model).
    The folder appears complete or not at all."""
    if not is_glowq(model):
        raise ConfigError("save_glowq: the model has no GlowQ layer; convert it with glowq(model, ...) first.")
    quants = {n: m.quant for n, m in model.named_modules() if isinstance(m, GlowQLinear)}
    plain = _plain_layers(model)
    quants.update({n: model.get_submodule(n) for n in plain})
    first = next(iter(quants.values()))
    group_modules = _groups_of(model)
    groups = [{"members": g.members, "error_before": g.error_before, "error_after": g.error_after,
               "score": g.score} for g in group_modules]
    meta = {"format": FORMAT, "version": VERSION, "bits": first.bits, "group_size": first.group_size,
            "axis": first.axis, "rank": group_modules[0].rank, "groups": groups, "plain": plain,
            "layers": {n: q.settings() for n, q in quants.items()}}
    return write_state_folder(model, path, META, meta)


def load_glowq(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_glowq` into ``model``, a float model of the architecture
    it was saved from (as loaded from the Hub / ``paretune.models.load``): the groups and layers
    are rebuilt from ``glowq.json`` (no quantisation or SVD is computed) and every tensor is read
    from ``model.safetensors``. On any error the model is left as it was. Returns the model."""
    path = Path(path)
    meta = read_state_meta(path, META, FORMAT, "GlowQ model description", "paretune.compress.glowq.save_glowq")
    if meta.get("version") != VERSION:
        raise AdapterFileError(f"{path / META} has version {meta.get('version')!r}; this paretune reads version "
                               f"{VERSION}.")
    if is_quantized(model):
        raise ParetuneError("load_glowq: this model is already quantised; load the folder into a fresh float model "
                            "of the architecture it was saved from.")
    try:
        rank, layers = int(meta["rank"]), meta["layers"]
        groups, plain = meta["groups"], list(meta["plain"])
        members_all = [n for g in groups for n in g["members"]] + plain
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{path / META} lacks or garbles an entry ({e}); save the model again.") from None

    def quant_for(name: str) -> tuple[nn.Module, QuantizedLinear]:
        base = saved_linear(model, name, path, _is_linear)
        s = layers.get(name)
        w = _weight(base)
        if s is None or (s["out_features"], s["in_features"]) != tuple(w.shape):
            raise AdapterFileError(f"{path}: module {name} is {tuple(w.shape)} here but "
                                   f"{None if s is None else (s['out_features'], s['in_features'])} in the file; "
                                   "load it into the architecture it was saved from.")
        q = QuantizedLinear(s["in_features"], s["out_features"], bits=s["bits"], group_size=s["group_size"],
                            axis=s["axis"], bias=s["bias"], dtype=w.dtype, device=w.device)
        q.train(base.training)
        return base, q

    plan: list[tuple[str, nn.Module, nn.Module]] = []  # (name, original, replacement)
    for g in groups:
        built = [(n, *quant_for(n)) for n in g["members"]]
        w = _weight(built[0][1])
        group = GlowQGroup(built[0][2].in_features, rank, g["members"], dtype=w.dtype, device=w.device)
        group.error_before, group.error_after, group.score = g["error_before"], g["error_after"], g["score"]
        for n, base, q in built:
            plan.append((n, base, GlowQLinear(q, group, torch.zeros(q.out_features, rank, dtype=w.dtype,
                                                                    device=w.device))))
    for n in plain:
        plan.append((n, *quant_for(n)))
    if len(set(members_all)) != len(members_all):
        raise AdapterFileError(f"{path / META} lists a module twice; save the model again.")
    for n, _, new in plan:
        _set(model, n, new)
    try:
        load_unique_state(model, path / WEIGHTS, meta.get("aliases", {}))
    except BaseException:
        for n, old, _ in plan:  # put the float layers back
            _set(model, n, old)
        raise
    return model
