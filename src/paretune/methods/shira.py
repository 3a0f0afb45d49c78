"""SHiRA (Bhardwaj et al., NeurIPS 2024, "Sparse High Rank Adapters", arXiv 2406.13175).

SHiRA trains a fixed, very sparse set of W's own entries: ΔW is zero except at ``n`` positions of
the (d_out, d_in) matrix chosen once by a mask, and only the values there train (paper §3.1). The
adapter is stored as those values and their int32 positions (paper Fig. 3a), and merging or
switching writes only those entries (paretune's :class:`~paretune.core.sparse.SparseDelta`).
Scaling is 1 (paper Lemma 4.3; PEFT's ``scaling`` 1.0) and the values start at zero, so the adapted
model starts equal to the base (PEFT's ``init_weights=True``).

**How many entries** (exactly one option decides; ``r`` is the default):

* ``r`` (default 32 when neither is given: PEFT's ``ShiraConfig.r`` default): ``n = r·(d_in + d_out)``
  per layer, the count of a rank-r LoRA, as PEFT's ``ShiraLayer.update_layer``
  (``num_shira_weight = r * (in_features + out_features)``). ``r`` does not bound the rank.
* ``fraction``: ``n = max(1, round(fraction · d_out · d_in))``, a share of each layer's entries
  (the paper's "1-2% of the weights"); ``fraction`` in (0, 1]. The rounding is a choice made here.

A count above ``d_out · d_in`` is a :class:`~paretune.errors.ConfigError` when the layer is built
(PEFT raises ``ValueError`` there); ``paretune.adapt`` then leaves the model as it was.

**Masks** (``mask``; paper §3.1 and appendix B):

* ``"random"`` (default; PEFT's only built-in mask, SHiRA-Rand): PEFT's ``mask_functions.random_mask``
  draw: a fresh CPU ``torch.Generator`` seeded with ``seed``, ``torch.randperm(d_out·d_in)``, the
  first ``n`` flat positions. PEFT seeds the generator with ``random_seed`` alone (not with the
  layer), and so does paretune: two layers of the same shape get the same positions, and the same
  seed gives PEFT's indices exactly (tested). PEFT's ``random_seed=None`` leaves the generator at
  torch's default seed 67280421310721; pass ``seed=67280421310721`` to reproduce that. Like PEFT,
  the draw permutes all d_out·d_in positions (int64, on the CPU) once per layer.
* ``"magnitude"`` (SHiRA-WM): the ``n`` largest |W| (W in the (d_out, d_in) view, at adapt time).
* ``"gradient"`` (SHiRA-Grad): the ``n`` largest |∂L/∂W| over a few calibration batches.
* ``"snip"`` (SHiRA-SNIP): the ``n`` largest |W ⊙ ∂L/∂W| (appendix B.5).
* ``"rows+columns"`` (SHiRA-Struct, appendix B.1): the diagonal (the paper's high-rank part) plus
  whole rows and columns. The paper takes every f-th row or column with f set by the sparsity; to
  reach the exact count ``n`` and let two adapters pick different lines (the paper's
  non-overlapping adapters, Lemma 4.5) paretune picks the lines from ``seed``: a CPU generator
  seeded with ``seed`` draws a permutation of the rows, then one of the columns, and lines are
  taken alternately (row, column, row, ...) until ``n`` entries are covered; the last line is cut
  (its first free entries in index order) so the count is exact. When ``n`` is below the diagonal's
  length, the first ``n`` diagonal entries are the mask.

Ties (magnitude, gradient, snip) go to the lower flat position (a stable sort): the paper and
PEFT say nothing of ties.

**Gradient-based masks need data**, which an option cannot carry into ``paretune.json``. The
scores come from :func:`gradient_scores` ``(model, batches, loss_fn=None, targets=None)``, which
runs one backward pass per batch on the model (plain, or with its adapters off) and returns a
:class:`ScoreMap`: module name -> |Σ_batches ∂L/∂W| / batches, in the (d_out, d_in) view. The
gradient is the one of the summed calibration loss (the paper: "collect gradients on a small
calibration set and then pick top 1-2% weights that receive the highest gradient magnitudes"; it
does not say whether magnitudes or gradients are summed over batches: gradients are, as
``.grad`` accumulates, which makes SNIP exactly |W ⊙ ∇L| of the calibration loss). ``"snip"``
multiplies the scores by |W| at adapt time, so one ScoreMap serves both masks. Pass it as the
``scores`` option::

    scores = shira.gradient_scores(model, batches)
    paretune.adapt(model, "shira", mask="snip", scores=scores)

``scores`` is never written into ``paretune.json`` (``to_dict`` leaves it out) and is dropped from
the config once the masks are chosen (the config is left with ``scores=None``), so the adapter does
not keep a dense score tensor per layer alive: the mask itself is saved as indices.
``paretune.load`` of a gradient or snip adapter needs no scores: :meth:`ShiraConfig.upgrade`
sets ``scores="from-file"`` (placeholder positions, replaced by the file's). A ScoreMap names
modules of one model object; bind a hand-made ``{name: tensor}`` dict with ``ScoreMap(model, d)``.

Every host kind is supported (PEFT: Linear only); the positions are in paretune's matrix view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.geometry import Geometry, geometry_for
from ..core.host import Host
from ..core.inject import match_targets
from ..core.registry import ALL_KINDS, register
from ..core.sparse import SparseDelta
from ..errors import ConfigError

MASKS = ("random", "magnitude", "gradient", "snip", "rows+columns")
NEEDS_SCORES = ("gradient", "snip")
FROM_FILE = "from-file"  # scores value set by ShiraConfig.upgrade: the positions come from the adapter file
PEFT_DEFAULT_R = 32  # peft.ShiraConfig.r default


# -- scores ------------------------------------------------------------------------------------

def _matrix_view(geometry: Geometry, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the base weight, in the (d_out, d_in) matrix view of ``geometry``."""
    if geometry.kind in ("conv1d", "embedding"):
        return t.T
    if geometry.kind == "conv2d":
        return t.reshape(geometry.d_out, -1)
    return t


def _base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, Host) else module


class ScoreMap(dict):
    """Module name -> score tensor (d_out, d_in) (matrix view), bound to the modules of one model.

    :func:`gradient_scores` returns one. ``ScoreMap(model, {name: tensor})`` binds a hand-made
    dict: each name must be a module of ``model`` that paretune can adapt, each tensor of its
    (d_out, d_in) shape (for GPT-2 Conv1D and Embedding that is the transpose of the weight)."""

    def __init__(self, model: nn.Module, scores: Mapping[str, torch.Tensor]):
        super().__init__()
        self.modules: dict[str, nn.Module] = {}
        for name, score in scores.items():
            try:
                module = _base_of(model.get_submodule(name))
            except AttributeError:
                raise ConfigError(f"shira scores: the model has no module {name!r}.") from None
            g = geometry_for(module)
            if g is None:
                raise ConfigError(f"shira scores: module {name!r} ({type(module).__name__}) is not a layer "
                                  "paretune can adapt.")
            if not isinstance(score, torch.Tensor) or tuple(score.shape) != (g.d_out, g.d_in):
                shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ConfigError(f"shira scores: {name!r} must be a ({g.d_out}, {g.d_in}) tensor (the layer's "
                                  f"(d_out, d_in) view), got {shape}.")
            self[name] = score
            self.modules[name] = module

    def name_of(self, module: nn.Module) -> str | None:
        for name, m in self.modules.items():
            if m is module:
                return name
        return None


def _run(model: nn.Module, batch: Any):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ConfigError("shira.gradient_scores: the model's output has no `loss`; pass "
                          "loss_fn=lambda output, batch: <a scalar loss>.")
    return loss


def gradient_scores(model: nn.Module, batches: Iterable[Any],
                    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                    targets: Any = None) -> ScoreMap:
    """|∂L/∂W| of every targeted layer over a few calibration batches, for ``mask="gradient"`` or
    ``mask="snip"`` (see the module docstring).

    ``batches``: an iterable of batches; a dict is passed as keyword arguments, a tuple or list as
    positional ones, anything else as the one argument. ``loss_fn(output, batch)`` gives the scalar
    loss (default: ``output.loss``, as a Hugging Face model computes it when the batch has labels).
    ``targets``: as for ``paretune.adapt`` (default all-linear); the scores must cover every module
    the adapter will target. One backward pass per batch; only the targeted weights get gradients
    (every ``requires_grad`` flag and existing ``.grad`` is restored afterwards). The model's
    train/eval mode is left as it is. Returns ``|Σ_b ∂L_b/∂W| / batches`` per module, float32, in the
    (d_out, d_in) view, on the weight's device.
    """
    names = match_targets(model, targets, ALL_KINDS, "shira")
    modules = {n: _base_of(model.get_submodule(n)) for n in names}
    weights = {n: m.weight for n, m in modules.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = {id(w): (w, w.grad) for w in weights.values()}
    result: dict[str, torch.Tensor] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        count = 0
        with torch.enable_grad():
            for batch in batches:
                output = _run(model, batch)
                loss = loss_fn(output, batch) if loss_fn is not None else _loss_of(output)
                loss.backward()
                count += 1
        if count == 0:
            raise ConfigError("shira.gradient_scores: `batches` gave no batch; pass a few calibration batches.")
        for n, w in weights.items():
            if w.grad is None:
                raise ConfigError(f"shira.gradient_scores: {n}.weight got no gradient; does the loss depend on it? "
                                  "Run it on the plain model (or with the adapters set inactive).")
            g = geometry_for(modules[n])
            result[n] = _matrix_view(g, w.grad.detach()).float().abs() / count
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for w, grad in grads.values():
            w.grad = grad
    return ScoreMap(model, result)


# -- config ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShiraConfig(AdapterConfig):
    """``r`` or ``fraction`` (one of them; ``r=32`` when neither is given), ``mask``, ``seed``
    (random and rows+columns masks), ``scores`` (gradient and snip masks; never saved)."""

    INIT_ONLY: ClassVar[tuple[str, ...]] = ("mask", "seed")  # the file holds the positions

    r: int | None = None
    fraction: float | None = None
    mask: str = "random"
    seed: int = 0
    scores: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.r is None and self.fraction is None:
            self.r = PEFT_DEFAULT_R
        super().__post_init__()

    def validate(self) -> None:
        self._require(self.r is None or self.fraction is None, "fraction", self.fraction,
                      f"give r (entries = r·(d_in + d_out), as PEFT) or fraction (a share of d_out·d_in), not both "
                      f"(r={self.r!r})")
        if self.r is not None:
            self._positive_int("r")
        else:
            f = self.fraction
            self._require(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1, "fraction", f,
                          "it must be in (0, 1]")
        self._one_of("mask", MASKS)
        self._seed("seed")
        s = self.scores
        if self.mask in NEEDS_SCORES:
            if s is None:
                raise ConfigError(
                    f"shira: mask={self.mask!r} needs gradient scores: compute them with "
                    "paretune.methods.shira.gradient_scores(model, batches) and pass scores=<that> to adapt "
                    "(or choose mask='random', 'magnitude' or 'rows+columns').")
            self._require(s == FROM_FILE if isinstance(s, str) else isinstance(s, ScoreMap), "scores",
                          type(s).__name__,
                          "pass what paretune.methods.shira.gradient_scores(model, batches) returns, or bind a "
                          "{module name: tensor} dict with paretune.methods.shira.ScoreMap(model, scores)")
        else:
            self._require(s is None, "scores", type(s).__name__,
                          f"scores apply to mask='gradient' or 'snip' only (mask={self.mask!r})")

    def to_dict(self) -> dict[str, Any]:
        """The options without ``scores`` (data, not an option: the mask is saved as indices)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scores"}

    @classmethod
    def upgrade(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved gradient or snip adapter is rebuilt without scores: its positions are in the file."""
        saved = dict(saved)
        if saved.get("mask") in NEEDS_SCORES and saved.get("scores") is None:
            saved["scores"] = FROM_FILE
        return saved

    def count(self, d_out: int, d_in: int) -> int:
        """Entries of one (d_out, d_in) layer: r·(d_in + d_out), or max(1, round(fraction·d_out·d_in))."""
        if self.r is not None:
            return self.r * (d_in + d_out)
        return max(1, round(self.fraction * d_out * d_in))


# -- masks -------------------------------------------------------------------------------------

def top_positions(score: torch.Tensor, n: int) -> torch.Tensor:
    """Flat positions of the ``n`` largest entries of ``score`` (ties: the lower position first)."""
    order = torch.argsort(score.flatten(), descending=True, stable=True)
    return order[:n]


def random_positions(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """PEFT's ``random_mask`` draw: the first ``n`` of ``randperm(d_out·d_in)`` from a CPU generator
    seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(d_out * d_in, generator=g)[:n]


def rows_columns_positions(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """SHiRA-Struct (appendix B.1): the diagonal, then whole rows and columns drawn from ``seed``
    (alternately row, column, ...), the last line cut so that exactly ``n`` entries are chosen."""
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    diag = torch.arange(min(d_out, d_in, n))
    mask[diag, diag] = True
    taken = diag.numel()
    g = torch.Generator()
    g.manual_seed(seed)
    rows = torch.randperm(d_out, generator=g).tolist()
    cols = torch.randperm(d_in, generator=g).tolist()
    lines: list[tuple[str, int]] = []
    for k in range(max(d_out, d_in)):
        if k < d_out:
            lines.append(("row", rows[k]))
        if k < d_in:
            lines.append(("col", cols[k]))
    for kind, i in lines:
        if taken >= n:
            break
        line = mask[i] if kind == "row" else mask[:, i]
        free = (~line).nonzero().flatten()[: n - taken]
        if kind == "row":
            mask[i, free] = True
        else:
            mask[free, i] = True
        taken += free.numel()
    return mask.flatten().nonzero().flatten()


@register(
    "shira",
    config=ShiraConfig,
    summary="SHiRA (Bhardwaj et al. 2024): train a fixed sparse set of W's entries (values + int32 indices); "
            "masks random (PEFT's), magnitude, gradient, snip, rows+columns",
    formula="r·(d_in + d_out) (LoRA-matched, as PEFT; r=32 by default), or max(1, round(fraction·d_out·d_in))",
)
class ShiraDelta(SparseDelta):
    """ΔW = values at the mask's positions, zero elsewhere (see the module docstring)."""

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: ShiraConfig) -> nn.Module | None:
        """For a gradient or snip mask: each layer's score tensor, looked up by module in the
        ScoreMap; the config then drops the scores (so they are not kept alive by the adapter)."""
        scores = config.scores
        if config.mask not in NEEDS_SCORES or not isinstance(scores, ScoreMap):
            return None
        per_layer = []
        for layer, g in enumerate(geometries):
            name = scores.name_of(g.base)
            if name is None:
                raise ConfigError(
                    f"shira: the scores hold nothing for adapted layer {layer} ({type(g.base).__name__}, "
                    f"{g.d_out} x {g.d_in}); compute them on this model object with gradient_scores(model, batches, "
                    "targets=<the same targets as adapt>).")
            score = scores[name]
            if tuple(score.shape) != (g.d_out, g.d_in):
                raise ConfigError(f"shira: scores[{name!r}] has shape {tuple(score.shape)}; the layer is "
                                  f"({g.d_out}, {g.d_in}).")
            per_layer.append(score)
        config.scores = None
        return Bank(scores=per_layer)

    def __init__(self, geometry: Geometry, config: ShiraConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        d_out, d_in = self.d_out, self.d_in
        n = config.count(d_out, d_in)
        if n > d_out * d_in:
            option = f"r={config.r} gives r·(d_in + d_out) = {n}" if config.r is not None else f"{n}"
            raise ConfigError(f"shira: {option} entries for a ({d_out} x {d_in}) layer of {d_out * d_in}; lower r "
                              "(or use fraction=...) or leave that layer out of targets.")
        self.set_support(self._positions(config, n, bank))

    def _positions(self, config: ShiraConfig, n: int, bank: nn.Module | None) -> torch.Tensor:
        d_out, d_in = self.d_out, self.d_in
        if config.mask == "random":
            return random_positions(d_out, d_in, n, config.seed)
        if config.mask == "rows+columns":
            return rows_columns_positions(d_out, d_in, n, config.seed)
        w = self.geometry.matrix().detach()
        if config.mask == "magnitude":
            return top_positions(w.float().abs(), n)
        if bank is None:  # scores == FROM_FILE: load_stored puts the saved positions in
            return torch.arange(n)
        score = bank.scores[self.layer].to(w.device, torch.float32)
        bank.scores[self.layer] = None  # used once; free it
        if config.mask == "snip":
            score = score * w.float().abs()
        return top_positions(score, n)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: ShiraConfig) -> int:
        return config.count(d_out, d_in)
