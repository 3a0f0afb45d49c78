"""Poly (Ponti, Sordoni, Bengio & Reddy, EACL 2023, "Combining Parameter-efficient Modules for
Task-level Generalisation", a.k.a. Polytropon) and MHR (Caccia, Ponti, Su, Pereira, Le Roux &
Sordoni, NeurIPS 2023, "Multi-Head Adapter Routing for Cross-Task Generalization").

Each adapted layer holds an *inventory* of m = ``n_skills`` LoRA modules (A_j ∈ R^{r×d_in},
B_j ∈ R^{d_out×r}) and routing logits Z ∈ R^{T×h×m} for T = ``n_tasks`` tasks and h = ``n_splits``
heads. For a row of task t, head k's routing weights are

    w_{t,k,j} = σ(Z_{t,k,j}) / (Σ_j' σ(Z_{t,k,j'}) + 1e-12)

(in training, σ(Z) is replaced by a sample of a relaxed Bernoulli, the binary Concrete /
Gumbel-sigmoid relaxation, with logits Z and temperature 1, as PEFT's ``router.py``). The row's
adapter is the LoRA ΔW_t = (1/r)·B_t A_t where, with the input dimension split into h blocks of
d_in/h columns and the output dimension into h blocks of d_out/h rows, head k's block of A_t is
Σ_j w_{t,k,j}·(block k of A_j), and likewise for B_t. With h = 1 this is Poly; with h > 1, MHR
(each head mixes its own blocks of the modules).

Numerics follow PEFT 0.21's ``peft/tuners/poly`` (``router.py``: logits of shape
(n_tasks, n_splits·n_skills) viewed as (n_tasks, n_splits, n_skills), σ then normalisation with
EPS = 1e-12, RelaxedBernoulli(temperature=1.0) when training; ``layer.py``: A split along d_in and
B along d_out into n_splits blocks, output x·A·B / r, i.e. scaling 1/r with no alpha). Init as
``layer.py``'s ``reset_poly_parameters``: every block of A_j kaiming-uniform (a = √5) over its
d_in/h inputs, so U(−1/√(d_in/h), 1/√(d_in/h)); B = 0 (``init_weights=False``: U(−1/√r, 1/√r), as
PEFT); routing logits U(−10⁻³, 10⁻³). Draws use torch's global generator (as PEFT and LoRA here).

Choices, stated:

* Routing logits are per layer (``share_router=False``, the default): the authors' Polytropon
  code builds the skill logits inside each adapted module, and PEFT gives every layer its own
  ``PolyRouter``. ``share_router=True`` keeps one Z for the whole adapter (held on its bank, saved
  once) instead.
* Task ids: one per batch row, given by :func:`task_ids` (PEFT passes ``task_ids`` to the
  forward). The host's input must have the batch as its first dimension. A forward with no task
  ids is an error unless the adapter was made with ``default_task=t`` (then every row is task t).
* ``train`` picks what trains (the MHR paper's few-shot variants, as its abstract defines them:
  MHR-z fine-tunes only the routing, not the adapters; MHR-μ discards the routing and fine-tunes
  the average of the pre-trained adapters):

  - ``"all"``: inventory and routing (Poly / MHR multi-task pre-training);
  - ``"routing"``: MHR-z, only the routing logits Z train, the inventory stays frozen (stored with
    the adapter, not trained; bring a pre-trained one in with :func:`copy_inventory`);
  - ``"inventory"``: MHR-μ, the routing is discarded: every head mixes its modules with the fixed
    uniform weights 1/m (in training too, no sampling) and only the inventory trains. The paper's
    MHR-μ fine-tunes the average of the pre-trained modules:
    ``copy_inventory(model, pretrained, average=True)`` sets every module to that average; the
    modules then get equal gradients and stay equal, so the adapter is that single averaged
    LoRA (it still stores, and counts, m copies of it; with an element-wise optimizer such as
    Adam the steps are the single LoRA's up to Adam's ε, plain SGD scales them by 1/m).
* Merge: ΔW depends on the task, so only a single task merges: the ``default_task`` (any task
  with ``train="inventory"``, where all tasks are the same), with the evaluation routing (σ, no
  sampling). Without a default task, merging is a :class:`ConfigError` and leaves the model as
  it was. While merged, :func:`task_ids` accepts only the merged task.
* Host kinds: Linear (as PEFT) and GPT-2 Conv1D (the same matrix map). n_splits must divide every
  adapted layer's d_in and d_out (PEFT's reshapes need it; r is not split).
* Not supported inside :func:`paretune.per_sample` with task ids set (that block runs each
  adapter on a subset of the rows, whose task ids the delta cannot tell); with ``default_task`` it
  works.

Trainable per layer: n_skills·r·(d_in + d_out) (none with ``train="routing"``), plus the routing
logits n_tasks·n_splits·n_skills per layer (per adapter with ``share_router=True``; none with
``train="inventory"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar, Iterator, Sequence

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import SharedInBank
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.inject import hosts, targets_by_model_type
from ..core.registry import register
from ..core.state import record_of, state_of
from ..errors import ConfigError, ParetuneError

EPS = 1e-12  # PEFT's router.py: added to the sum of σ(Z) before normalising
TRAIN_CHOICES = ("all", "routing", "inventory")

# model_type -> default targets: PEFT's TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING (constants.py)
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "bart": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "gpt2": ("c_attn",),
}


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's Poly targets for the model's architecture (``model.config.model_type``)."""
    return list(targets_by_model_type(model, ARCHITECTURES, "poly",
                                      "Pass targets=[...] (e.g. the attention query and value projections)."))


@dataclasses.dataclass
class PolyConfig(AdapterConfig):
    """``r``: rank of each module; ``n_tasks``: T; ``n_skills``: m, modules per layer;
    ``n_splits``: h, routing heads (1: Poly, > 1: MHR); ``poly_type``: the router ("poly", PEFT's
    only one); ``train``: "all", "routing" (MHR-z) or "inventory" (MHR-μ); ``share_router``: one
    routing Z for all layers instead of one per layer; ``default_task``: the task of rows given no
    task ids (None: such a forward is an error); ``init_weights``: B = 0 (False: random B)."""

    INIT_ONLY: ClassVar[tuple[str, ...]] = ("init_weights",)
    r: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    poly_type: str = "poly"
    train: str = "all"
    share_router: bool = False
    default_task: int | None = None
    init_weights: bool = True

    def validate(self) -> None:
        for option in ("r", "n_tasks", "n_skills", "n_splits"):
            self._positive_int(option)
        self._one_of("poly_type", ("poly",))
        self._one_of("train", TRAIN_CHOICES)
        self._flag("share_router")
        self._flag("init_weights")
        t = self.default_task
        self._require(t is None or (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.n_tasks),
                      "default_task", t, f"it must be None or a task id in [0, n_tasks={self.n_tasks})")

    @property
    def routed(self) -> bool:
        """Whether the adapter has routing logits (all but MHR-μ)."""
        return self.train != "inventory"


def _check_splits(geometries: list[Geometry], config: PolyConfig) -> None:
    h = config.n_splits
    bad = [g for g in geometries if g.d_in % h or g.d_out % h]
    if bad:
        g = bad[0]
        raise ConfigError(
            f"poly: n_splits={h} must divide every adapted layer's input and output width, but "
            f"{g.name or 'a layer'} is {g.d_in} -> {g.d_out}; choose n_splits dividing both (e.g. 1) "
            "or leave that layer out of targets."
        )


def _logits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.float32).uniform_(-1e-3, 1e-3).to(device, dtype))


def mixing_weights(logits: torch.Tensor, *, sample: bool) -> torch.Tensor:
    """Routing weights from logits (..., m): σ(Z) (or a relaxed-Bernoulli sample, temperature 1,
    with ``sample``) normalised over the last dimension by its sum + EPS."""
    z = RelaxedBernoulli(temperature=1.0, logits=logits).rsample() if sample else torch.sigmoid(logits)
    return z / (z.sum(dim=-1, keepdim=True) + EPS)


@register(
    "poly",
    config=PolyConfig,
    summary="Poly (Ponti et al. 2023) / MHR (Caccia et al. 2023): per-task routed mixtures of an inventory of "
            "n_skills LoRA modules, over n_splits heads; task ids per row via paretune.methods.poly.task_ids",
    formula="n_skills·r·(d_in + d_out) + n_tasks·n_splits·n_skills router logits (train='routing': the logits "
            "only; train='inventory': the modules only; share_router=True: the logits once per adapter)",
    kinds=("linear", "conv1d"),
    default_targets=default_targets,
)
class PolyDelta(SharedInBank):
    """One layer's inventory A (m, r, d_in) and B (m, d_out, r), and its routing logits
    (n_tasks, n_splits·n_skills) unless they are shared (then on the bank) or absent (MHR-μ).
    The bank also carries the task ids set by :func:`task_ids`."""

    mergeable = True

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: PolyConfig) -> Bank:
        _check_splits(geometries, config)
        bank = Bank()
        bank.ids = None  # the task id of every batch row (a CPU long tensor), set by task_ids()
        bank.ids_on = {}  # the same ids, per device
        if config.routed and config.share_router:
            w = geometries[0].weight
            bank.router = _logits((config.n_tasks, config.n_splits * config.n_skills), adapter_dtype(w), w.device)
        return bank

    def __init__(self, geometry: Geometry, config: PolyConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt)
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        m, r, h = config.n_skills, config.r, config.n_splits
        self.scaling = 1.0 / r  # PEFT's layer.py: x.bmm(A).bmm(B) / r
        bound = 1.0 / math.sqrt(self.d_in // h)  # kaiming_uniform(a=√5) over each head's d_in/h inputs
        a = torch.empty(m, r, self.d_in).uniform_(-bound, bound)
        if config.init_weights:
            b = torch.zeros(m, self.d_out, r)
        else:
            b = torch.empty(m, self.d_out, r).uniform_(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
        a, b = a.to(w.device, dtype), b.to(w.device, dtype)
        if config.train == "routing":  # MHR-z: the inventory is frozen (buffers: not counted, not trained)
            self.register_buffer("A", a, persistent=False)
            self.register_buffer("B", b, persistent=False)
        else:
            self.A = nn.Parameter(a)
            self.B = nn.Parameter(b)
        if config.routed and not config.share_router:
            self.router = _logits((config.n_tasks, h * m), dtype, w.device)
        else:
            self.router = None
        self.shared_names = ("router",) if config.routed and config.share_router else ()

    # -- routing -----------------------------------------------------------------------------
    @property
    def logits(self) -> torch.Tensor | None:
        """Routing logits (n_tasks, n_splits·n_skills) of this layer (None with train="inventory")."""
        if not self.config.routed:
            return None
        return self.bank.router if self.config.share_router else self.router

    def _row_tasks(self, rows: int, device: torch.device) -> torch.Tensor:
        """The task id of each of ``rows`` rows (or one id for all rows), on ``device``."""
        bank = self.bank
        if bank.ids is None:
            t = self.config.default_task
            if t is None:
                raise ParetuneError(
                    "poly: this forward has no task ids. Run it inside `with paretune.methods.poly.task_ids(model, ids):` "
                    "(one task id per batch row), or adapt with default_task=<id> to route rows without ids to one task."
                )
            return torch.tensor([t], dtype=torch.long, device=device)
        if bank.ids.numel() != rows:
            raise ParetuneError(
                f"poly: {bank.ids.numel()} task ids were set but the batch has {rows} rows; pass one task id per "
                "row (paretune.per_sample runs adapters on subsets of rows: use default_task there instead)."
            )
        ids = bank.ids_on.get(device)
        if ids is None:
            ids = bank.ids_on[device] = bank.ids.to(device)
        return ids

    def weights(self, rows: int, device: torch.device, *, sample: bool | None = None) -> torch.Tensor:
        """Routing weights (rows or 1, n_splits, n_skills) for the current task ids; ``sample``
        (default: in training mode) draws the relaxed-Bernoulli routing instead of σ."""
        c = self.config
        if not c.routed:  # MHR-μ: the uniform average of the modules
            return torch.full((1, c.n_splits, c.n_skills), 1.0 / c.n_skills, dtype=self.A.dtype, device=device)
        z = self.logits[self._row_tasks(rows, device)].view(-1, c.n_splits, c.n_skills)
        return mixing_weights(z, sample=self.training if sample is None else sample)

    def mixed(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row LoRA factors for routing weights w (n, h, m): A (n, r, d_in), B (n, d_out, r)."""
        c = self.config
        m, r, h = c.n_skills, c.r, c.n_splits
        w = w.to(self.A.dtype)
        a = torch.einsum("nhm,mrhd->nrhd", w, self.A.view(m, r, h, self.d_in // h)).reshape(-1, r, self.d_in)
        b = torch.einsum("nhm,mhor->nhor", w, self.B.view(m, h, self.d_out // h, r)).reshape(-1, self.d_out, r)
        return a, b

    # -- the contract ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        a, b = self.mixed(self.weights(rows, x.device))
        xf = x.reshape(rows, -1, self.d_in).to(a.dtype)  # (rows, tokens, d_in)
        y = torch.matmul(torch.matmul(xf, a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling
        return base_out + y.reshape(base_out.shape).to(base_out.dtype)

    def merge_task(self) -> int:
        """The task a merge folds in: ``default_task`` (0 with train="inventory", all tasks alike)."""
        c = self.config
        if not c.routed:
            return 0
        if c.default_task is None:
            raise ConfigError(
                "poly: its ΔW depends on the task, so only one task can be merged; adapt with default_task=<id> "
                "to merge that task (or keep the adapter unmerged and pass task ids)."
            )
        return c.default_task

    def task_weight(self, task: int) -> torch.Tensor:
        """Dense ΔW (d_out, d_in) of task ``task``, with the evaluation routing (σ, no sampling)."""
        c = self.config
        if c.routed:
            w = mixing_weights(self.logits[task].view(1, c.n_splits, c.n_skills), sample=False)
        else:
            w = self.weights(1, self.A.device)
        a, b = self.mixed(w)
        return self.scaling * (b[0] @ a[0])

    def delta_weight(self) -> torch.Tensor:
        return self.task_weight(self.merge_task())

    def _stored(self) -> dict[str, torch.Tensor]:
        out = super()._stored()  # own parameters, the shared router with the first layer
        if self.config.train == "routing":  # the frozen inventory is part of the adapter
            out.update(A=self.A, B=self.B)
        return out

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: PolyConfig) -> int:
        inventory = config.n_skills * config.r * (d_in + d_out) if config.train != "routing" else 0
        router = config.n_tasks * config.n_splits * config.n_skills
        return inventory + (router if config.routed and not config.share_router else 0)

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: PolyConfig) -> int:
        if config.routed and config.share_router:
            return config.n_tasks * config.n_splits * config.n_skills
        return 0

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, r={c.r}, n_skills={c.n_skills}, "
                f"n_splits={c.n_splits}, n_tasks={c.n_tasks}, train={c.train!r}")


# -- task ids and inventories ------------------------------------------------------------------

def _poly_deltas(model: nn.Module, name: str) -> dict[str, PolyDelta]:
    """Adapter ``name``'s Poly delta on every module it adapts, by module name."""
    record = record_of(model, name)
    if record.method != "poly":
        raise ParetuneError(f"adapter {name!r} is a {record.method} adapter, not poly.")
    return {n: h.deltas[name] for n, h in hosts(model) if name in h.deltas}


def _as_ids(ids: Sequence[int] | torch.Tensor, n_tasks: int) -> torch.Tensor:
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids))
    if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(
            f"poly: task ids must be a non-empty 1-D sequence of integers, one per batch row; got {ids!r}."
        )
    t = t.detach().to("cpu", torch.long)
    bad = t[(t < 0) | (t >= n_tasks)]
    if bad.numel():
        raise ConfigError(
            f"poly: task id {bad[0].item()} is out of range: the adapter has n_tasks={n_tasks}, so ids must be in "
            f"[0, {n_tasks}); adapt with a larger n_tasks to add tasks."
        )
    return t


@contextlib.contextmanager
def task_ids(model: nn.Module, ids: Sequence[int] | torch.Tensor, name: str = "default") -> Iterator[nn.Module]:
    """Within the block, row i of every batch goes through Poly adapter ``name`` as task ``ids[i]``.

    >>> with paretune.methods.poly.task_ids(model, [0, 2, 2, 1]):
    ...     logits = model(input_ids).logits

    ``ids``: one integer in [0, n_tasks) per batch row (a list or a 1-D tensor). Blocks nest (the
    inner ids hold inside). A merged adapter accepts only the task it merged.
    """
    deltas = _poly_deltas(model, name)
    config = state_of(model).adapters[name].config
    t = _as_ids(ids, config.n_tasks)
    if state_of(model).is_merged(name) and config.routed and bool((t != config.default_task).any()):
        raise ParetuneError(
            f"poly: adapter {name!r} is merged for task {config.default_task}; unmerge it (paretune.unmerge) to "
            "run other tasks."
        )
    banks = list({id(d.bank): d.bank for d in deltas.values()}.values())
    before = [(b.ids, b.ids_on) for b in banks]
    for b in banks:
        b.ids, b.ids_on = t, {}
    try:
        yield model
    finally:
        for b, (ids_before, on_before) in zip(banks, before):
            b.ids, b.ids_on = ids_before, on_before


@torch.no_grad()
def copy_inventory(model: nn.Module, source: nn.Module, *, name: str = "default", source_name: str = "default",
                   average: bool = False) -> nn.Module:
    """Copy the module inventory (every A_j, B_j) of Poly adapter ``source_name`` on ``source`` into
    adapter ``name`` on ``model``, module by module (the same module names, widths and rank); the
    routing logits are left as they are. ``average=True`` writes the mean of the source's modules
    into every module of ``model`` (MHR-μ's start; any numbers of modules). For MHR-z / MHR-μ
    after multi-task pre-training: adapt ``model`` with train="routing" / "inventory", then copy.
    Nothing changes if any module does not fit."""
    ours, theirs = _poly_deltas(model, name), _poly_deltas(source, source_name)
    plan = []
    for module, d in ours.items():
        s = theirs.get(module)
        if s is None:
            raise ParetuneError(f"poly: {module} has no adapter {source_name!r} on the source model; adapt the same targets.")
        if s.A.shape[1:] != d.A.shape[1:] or s.B.shape[1:] != d.B.shape[1:]:
            raise ParetuneError(
                f"poly: {module}: the source modules are {tuple(s.A.shape[1:])} / {tuple(s.B.shape[1:])} (A / B), the "
                f"target's {tuple(d.A.shape[1:])} / {tuple(d.B.shape[1:])}; use the same rank r and base model."
            )
        if not average and s.A.shape[0] != d.A.shape[0]:
            raise ParetuneError(
                f"poly: the source has n_skills={s.A.shape[0]}, the target {d.A.shape[0]}; use the same n_skills, "
                "or average=True."
            )
        plan.append((d, s))
    for d, s in plan:
        a, b = (s.A.mean(0, keepdim=True), s.B.mean(0, keepdim=True)) if average else (s.A, s.B)
        d.A.copy_(a.to(d.A).expand_as(d.A))
        d.B.copy_(b.to(d.B).expand_as(d.B))
    return model
