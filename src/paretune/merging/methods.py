"""Merging task vectors: task arithmetic, weighted average, TIES, DARE and PCB.

A task vector is the difference between a fine-tuned weight and the base weight it was tuned from,
``tau = finetuned - base`` (Ilharco et al. 2023). Every function here takes the task vectors of ONE
tensor (one per task, all of the same shape and dtype) and returns the merged task vector of that
tensor, in the same shape and dtype. The caller adds it to the base:
``merged = base + lam * fn(task_vectors, ...)``.

    import torch
    from paretune.merging import ties

    tau_a = finetuned_a["w"] - base["w"]
    tau_b = finetuned_b["w"] - base["w"]
    merged_w = base["w"] + 1.0 * ties([tau_a, tau_b], density=0.2)

Choices that hold for every function:

* Arithmetic runs in float32 (float64 when the inputs are float64); the result is cast back to the
  inputs' dtype, so half-precision inputs are not summed in half precision.
* Inputs must be floating tensors of one shape, dtype and device, and finite (a NaN or inf entry
  raises ``ConfigError``: order statistics of non-finite values are meaningless).
* Top-k selections and quantiles use ``torch.kthvalue`` on the flattened tensor, never
  ``torch.quantile`` (which refuses tensors over 16M entries, e.g. a 49152 x 576 embedding).
  Peak extra memory is a few copies of one task vector in the working dtype; nothing stacks all
  tasks into one ``n x d`` tensor, except that TIES and DARE keep the n trimmed task vectors.
* :mod:`paretune.merging.blockwise` (``ties_blocks``, ``dare_blocks``, ``pcb_blocks``) computes
  the same results over a tensor given in row blocks (their whole-tensor statistics in passes over
  the blocks), for merges that must not hold a whole tensor; its ``BLOCK_METHODS`` maps method
  names to them.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "METHODS",
    "dare",
    "pcb",
    "search_lambda",
    "task_arithmetic",
    "ties",
    "weighted_average",
]

MAJORITY_SIGN_METHODS = ("total", "frequency")
DARE_COMBINE = ("linear", "ties")
DEFAULT_LAMBDA_GRID = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


# ----------------------------------------------------------------------------------------------
# input checks


def _check_tvs(tvs: Sequence[Tensor], fn: str) -> list[Tensor]:
    if isinstance(tvs, Tensor):
        raise ConfigError(
            f"{fn}: task vectors must be a list of tensors (one per task), got a single tensor; "
            "pass [tau_1, tau_2, ...] (use list(t.unbind(0)) for a stacked tensor)."
        )
    try:
        tvs = list(tvs)
    except TypeError:
        raise ConfigError(
            f"{fn}: task vectors must be a list of tensors, got {type(tvs).__name__}."
        ) from None
    if not tvs:
        raise ConfigError(f"{fn}: the list of task vectors is empty; pass at least one tensor.")
    for i, t in enumerate(tvs):
        if not isinstance(t, Tensor):
            raise ConfigError(
                f"{fn}: task vector {i} is a {type(t).__name__}, not a torch.Tensor; "
                "pass tensors (finetuned - base)."
            )
        if not t.is_floating_point():
            raise ConfigError(
                f"{fn}: task vector {i} has dtype {t.dtype}; task vectors must be floating "
                "tensors (convert with .float())."
            )
    first = tvs[0]
    for i, t in enumerate(tvs[1:], start=1):
        if t.shape != first.shape:
            raise ConfigError(
                f"{fn}: task vector {i} has shape {tuple(t.shape)} but task vector 0 has "
                f"{tuple(first.shape)}; merge only task vectors of the same tensor."
            )
        if t.dtype != first.dtype:
            raise ConfigError(
                f"{fn}: task vector {i} has dtype {t.dtype} but task vector 0 has {first.dtype}; "
                "convert them to one dtype first."
            )
        if t.device != first.device:
            raise ConfigError(
                f"{fn}: task vector {i} is on {t.device} but task vector 0 is on {first.device}; "
                "move them to one device first."
            )
    for i, t in enumerate(tvs):
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(
                f"{fn}: task vector {i} contains NaN or inf entries; check the fine-tuned and "
                "base weights it was computed from."
            )
    return tvs


def _check_weights(weights: Sequence[float] | None, n: int, fn: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)):
        raise ConfigError(f"{fn}: weights must be a list of {n} numbers, got {weights!r}.")
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"{fn}: weights must be a list of {n} numbers, got {weights!r}.") from None
    if len(values) != n:
        raise ConfigError(
            f"{fn}: got {len(values)} weights for {n} task vectors; pass one weight per task."
        )
    for i, w in enumerate(values):
        if not math.isfinite(w):
            raise ConfigError(f"{fn}: weight {i} is {w}; weights must be finite numbers.")
    return values


def _check_fraction(value: float, name: str, fn: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{fn}: {name} must be a number in (0, 1], got {value!r}.") from None
    if not (0.0 < v <= 1.0):
        raise ConfigError(
            f"{fn}: {name} must be in (0, 1] (the fraction of entries kept), got {value!r}."
        )
    return v


def _check_majority(majority_sign: str, fn: str) -> str:
    if majority_sign not in MAJORITY_SIGN_METHODS:
        raise ConfigError(
            f"{fn}: majority_sign must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
            f"got {majority_sign!r}."
        )
    return majority_sign


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# shared pieces


def _kth_smallest(x: Tensor, index: int) -> Tensor:
    """The entry at 0-based ``index`` of ``sorted(x)`` (x is 1-D), without sorting."""
    return x.kthvalue(index + 1).values


def _keep_top_magnitude(x: Tensor, density: float) -> Tensor:
    """Zero all but the ``k = max(1, int(density * numel))`` entries of largest magnitude.

    k is PEFT's ``int(density * numel)`` (peft/utils/merge_utils.py, magnitude_based_pruning),
    raised to at least one entry as mergekit does (mergekit/sparsify.py, magnitude), so a small
    tensor is never wiped out by a low density. Entries tied with the k-th largest magnitude are
    kept in index order, so exactly k entries survive and the choice is deterministic.
    """
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    k = max(1, int(density * n))
    a = x.abs().reshape(-1)
    t = _kth_smallest(a, n - k)  # the k-th largest magnitude
    keep = a > t
    missing = k - int(keep.sum())
    if missing > 0:
        tied = torch.nonzero(a == t, as_tuple=False).reshape(-1)[:missing]
        keep[tied] = True
    return x * keep.reshape(x.shape)


def _elect_and_merge(
    tvs: list[Tensor], weights: list[float], majority_sign: str
) -> Tensor:
    """TIES steps 2 and 3: elect a sign per entry, then average the entries that agree with it.

    The sign is elected from the (trimmed) task vectors BEFORE the weights are applied, and the
    disjoint mean divides the weighted sum by the NUMBER of agreeing tasks, as PEFT does
    (peft/utils/merge_utils.py, ties / calculate_majority_sign_mask / disjoint_merge). An entry
    whose elected mass (or count) is exactly zero gets the sign +1 (PEFT; the reference code
    instead uses the sign of the whole tensor's mass there). Zero entries never agree.
    """
    total = torch.zeros_like(tvs[0])
    for t in tvs:
        total += t if majority_sign == "total" else torch.sign(t)
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    del total
    mixed = torch.zeros_like(tvs[0])
    count = torch.zeros_like(tvs[0])
    for w, t in zip(weights, tvs):
        agree = torch.sign(t) == elected
        mixed.add_(t * agree, alpha=w)
        count.add_(agree)
    return mixed / count.clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# methods


def task_arithmetic(tvs: Sequence[Tensor], *, weights: Sequence[float] | None = None) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
    ``tau_m = sum_i w_i * tau_i``.

    Args:
        tvs: one task vector per task, all of one shape and dtype.
        weights: one weight per task (default 1 each). Any finite value: a negative weight
            subtracts a task ("forgetting by negation" in the paper).

    Returns:
        The merged task vector, in the shape and dtype of the inputs.
    """
    tvs = _check_tvs(tvs, "task_arithmetic")
    w = _check_weights(weights, len(tvs), "task_arithmetic")
    dtype = tvs[0].dtype
    out = torch.zeros_like(tvs[0], dtype=_work_dtype(dtype))
    for wi, t in zip(w, tvs):
        out.add_(t.to(out.dtype), alpha=wi)
    return out.to(dtype)


def weighted_average(tvs: Sequence[Tensor], *, weights: Sequence[float] | None = None) -> Tensor:
    """Weighted average of task vectors: ``tau_m = sum_i w_i tau_i / sum_i w_i``.

    With the default uniform weights, ``base + tau_m`` is the plain average of the fine-tuned
    models (the uniform "model soup" of Wortsman et al. 2022).

    Args:
        tvs: one task vector per task, all of one shape and dtype.
        weights: one non-negative weight per task with a positive sum (default uniform).

    Returns:
        The merged task vector, in the shape and dtype of the inputs.
    """
    tvs = _check_tvs(tvs, "weighted_average")
    w = _check_weights(weights, len(tvs), "weighted_average")
    if any(wi < 0 for wi in w) or sum(w) <= 0:
        raise ConfigError(
            f"weighted_average: weights must be non-negative with a positive sum, got {w}; "
            "use task_arithmetic for signed combinations."
        )
    dtype = tvs[0].dtype
    out = torch.zeros_like(tvs[0], dtype=_work_dtype(dtype))
    for wi, t in zip(w, tvs):
        out.add_(t.to(out.dtype), alpha=wi)
    return (out / sum(w)).to(dtype)


def ties(
    tvs: Sequence[Tensor],
    *,
    density: float = 0.2,
    weights: Sequence[float] | None = None,
    majority_sign: str = "total",
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
    Models"): trim, elect sign, disjoint merge.

    1. Trim: in each task vector keep the ``density`` fraction of entries of largest magnitude
       (the paper's top-k%, default k = 20%), zero the rest. The count is
       ``max(1, int(density * numel))`` per tensor; ties at the cut are kept in index order.
    2. Elect: per entry, ``gamma = sign(sum_i tau_i)`` (``majority_sign="total"``, the paper's
       mass-based election) or the sign held by more tasks (``"frequency"``, PEFT's
       ``majority_sign_method``); a zero total elects +1.
    3. Disjoint merge: ``tau_m = sum_{i agrees} w_i tau_i / #{i agrees}``, where task i agrees
       when ``sign(tau_i) == gamma`` (trimmed zeros never agree); 0 where no task agrees.

    Weights follow PEFT (peft/utils/merge_utils.py, ``ties``): the sign is elected from the
    unweighted trimmed vectors, the weights scale the agreeing entries, and the mean divides by
    the count of agreeing tasks. The paper has no per-task weights (weights 1 reproduce it);
    the paper's global scale lambda is the caller's ``lam``. The reference code
    (prateeky2806/ties-merging, src/utils/merge_utils.py) trims the whole flattened model at
    once; here each tensor is trimmed on its own, as PEFT and mergekit do.

    Args:
        tvs: one task vector per task, all of one shape and dtype.
        density: fraction of entries kept per task, in (0, 1]; 1 keeps all.
        weights: one weight per task (default 1 each).
        majority_sign: ``"total"`` or ``"frequency"``.

    Returns:
        The merged task vector, in the shape and dtype of the inputs.
    """
    tvs = _check_tvs(tvs, "ties")
    w = _check_weights(weights, len(tvs), "ties")
    density = _check_fraction(density, "density", "ties")
    _check_majority(majority_sign, "ties")
    dtype = tvs[0].dtype
    work = _work_dtype(dtype)
    trimmed = [_keep_top_magnitude(t.to(work), density) for t in tvs]
    return _elect_and_merge(trimmed, w, majority_sign).to(dtype)


def dare(
    tvs: Sequence[Tensor],
    *,
    density: float,
    weights: Sequence[float] | None = None,
    combine: str = "linear",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    majority_sign: str = "total",
) -> Tensor:
    """DARE, Drop And REscale (Yu et al. 2024, "Language Models are Super Mario: Absorbing
    Abilities from Homologous Models as a Free Lunch").

    Each entry of each task vector is dropped independently with probability ``p = 1 - density``
    and the survivors are rescaled by ``1 / density``, which keeps the expectation of every
    entry: ``tau_i' = m_i * tau_i / density``, ``m_i ~ Bernoulli(density)``. Then

    * ``combine="linear"``: ``tau_m = sum_i w_i tau_i'`` (PEFT's ``dare_linear``);
    * ``combine="ties"``: TIES sign election and disjoint mean over the ``tau_i'`` (PEFT's
      ``dare_ties``; see :func:`ties` for how weights and ``majority_sign`` enter).

    The mask is drawn as PEFT draws it, ``torch.bernoulli(torch.full_like(tau, density))``, task
    by task in list order, from ``generator`` if given, else from a fresh generator seeded with
    ``seed``, else from torch's global generator (then ``torch.manual_seed`` makes it
    reproducible, and the result equals PEFT's after the same ``torch.manual_seed``). Draws
    depend on the device and, for half-precision inputs, not on their dtype (masks are drawn in
    float32). ``density=1`` drops nothing and draws nothing. :func:`paretune.merging.blockwise.dare_blocks` draws the same
    masks for a tensor given in row blocks.

    Args:
        tvs: one task vector per task, all of one shape and dtype.
        density: probability of keeping an entry, in (0, 1] (the paper's ``1 - p``).
        weights: one weight per task (default 1 each).
        combine: ``"linear"`` or ``"ties"``.
        generator: a ``torch.Generator`` on the tensors' device; it is advanced.
        seed: seed for a fresh generator (give ``generator`` or ``seed``, not both).
        majority_sign: sign election for ``combine="ties"``: ``"total"`` or ``"frequency"``.

    Returns:
        The merged task vector, in the shape and dtype of the inputs.
    """
    tvs = _check_tvs(tvs, "dare")
    w = _check_weights(weights, len(tvs), "dare")
    density = _check_fraction(density, "density", "dare")
    _check_majority(majority_sign, "dare")
    if combine not in DARE_COMBINE:
        raise ConfigError(f"dare: combine must be 'linear' or 'ties', got {combine!r}.")
    generator = _dare_generator(generator, seed, tvs[0].device)
    dtype = tvs[0].dtype
    work = _work_dtype(dtype)
    dropped = []
    for t in tvs:
        x = t.to(work)
        if density < 1.0:
            mask = torch.bernoulli(torch.full_like(x, density), generator=generator)
            x = x * mask / density
        dropped.append(x)
    if combine == "linear":
        out = torch.zeros_like(dropped[0])
        for wi, x in zip(w, dropped):
            out.add_(x, alpha=wi)
        return out.to(dtype)
    return _elect_and_merge(dropped, w, majority_sign).to(dtype)


def _dare_generator(
    generator: torch.Generator | None, seed: int | None, device: torch.device
) -> torch.Generator | None:
    """The generator DARE draws from: ``generator``, a fresh one seeded with ``seed``, or None
    (torch's global generator)."""
    if generator is not None and seed is not None:
        raise ConfigError("dare: give either generator or seed, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ConfigError(
                f"dare: generator must be a torch.Generator, got {type(generator).__name__}."
            )
        if generator.device.type != device.type:
            raise ConfigError(
                f"dare: the generator is on {generator.device} but the task vectors are on "
                f"{device}; create it with torch.Generator(device={str(device)!r})."
            )
    elif seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"dare: seed must be an integer, got {seed!r}.")
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return generator


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(), x.max()
    if not bool(hi > lo):
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def _check_pcb_options(ratio: float, clip: float) -> tuple[float, float]:
    ratio = _check_fraction(ratio, "ratio", "pcb")
    try:
        clip = float(clip)
    except (TypeError, ValueError):
        raise ConfigError(f"pcb: clip must be a number in [0, 0.5), got {clip!r}.") from None
    if not (0.0 <= clip < 0.5):
        raise ConfigError(f"pcb: clip must be in [0, 0.5), got {clip!r}.")
    return ratio, clip


def pcb(
    tvs: Sequence[Tensor],
    *,
    ratio: float = 0.1,
    weights: Sequence[float] | None = None,
    clip: float = 1e-4,
) -> Tensor:
    """PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

    Follows the reference code (duguodong7/pcb-merging, pcb-merging.py, ``PCB_merge``) step by
    step, applied to one tensor, flattened (the reference flattens the whole model into one
    vector per task; here every tensor is balanced on its own). For n tasks of d entries:

    1. Clip: ``a_i = clamp(|tau_i|, lo_i, hi_i)`` with ``lo_i = sorted(|tau_i|)[int(d*clip)]`` and
       ``hi_i = sorted(|tau_i|)[int(d*(1-clip) - 1)]`` (the reference's order statistics, 0-based,
       not interpolated quantiles); ``tau^_i = sign(tau_i) * a_i``.
    2. Intra-balancing: ``b_intra_i = exp(n * N(a_i)^2)``, ``N`` the per-task min-max
       normalisation. The paper writes ``Softmax(N * Norm(tau_i * tau_i))``; the reference
       squares the normalised magnitude and omits the softmax denominator. Both differences from
       the formula are kept as in the code; the denominator is a per-task constant that step 4
       cancels. For the same reason this computes ``exp(n * (N^2 - 1))``, which equals the
       reference after step 4 and cannot overflow for many tasks.
    3. Inter-balancing: ``b_inter_i = tanh(tau_i * sum_j tau_j)`` on the UNclipped task vectors,
       without normalisation (pcb-merging.py; the vision script vision_source_code/pcb.py
       instead multiplies by the sum of sign-times-normalised vectors).
    4. ``b_i = b_intra_i * b_inter_i``; with ``t_i = sorted(b_i)[int(d*(1-ratio))]``,
       ``s_i = (max(b_i, t_i) - t_i) / (max(b_i) - t_i)``: the top ``ratio`` fraction is kept,
       min-max normalised, everything else is 0.
    5. ``tau_m = sum_i w_i * s_i * tau^_i / max(sum_i s_i, 1e-12)``; the per-task weights ``w_i``
       are the paper's lambda_i (the reference searches them in [0.8, 1.3]; see
       :func:`search_lambda`) and scale only the numerator, as in the reference's ``get_score``.

    Where the reference divides 0 by 0 (a task whose clipped magnitudes are all equal in step 2,
    or whose balancing scores are all equal above the cut in step 4) this uses 0 instead of NaN:
    that task then weighs all entries equally in step 2, or contributes nothing in step 4.

    Args:
        tvs: one task vector per task, all of one shape and dtype.
        ratio: fraction of entries kept per task, in (0, 1] (the paper's r; reference default 0.1).
        weights: one lambda per task (default 1 each).
        clip: fraction clipped at each end of every task's magnitudes, in [0, 0.5).

    Returns:
        The merged task vector, in the shape and dtype of the inputs.
    """
    tvs = _check_tvs(tvs, "pcb")
    w = _check_weights(weights, len(tvs), "pcb")
    ratio, clip = _check_pcb_options(ratio, clip)
    dtype, shape = tvs[0].dtype, tvs[0].shape
    work = _work_dtype(dtype)
    n, d = len(tvs), tvs[0].numel()
    if d == 0:
        return torch.zeros_like(tvs[0])
    flat = [t.to(work).reshape(-1) for t in tvs]
    total = torch.zeros_like(flat[0])
    for x in flat:
        total += x
    numerator = torch.zeros_like(flat[0])
    denominator = torch.zeros_like(flat[0])
    lo_index, hi_index = int(d * clip), int(d * (1 - clip) - 1)
    cut_index = int(d * (1 - ratio))
    for wi, x in zip(w, flat):
        a = x.abs()
        a = torch.clamp(a, min=_kth_smallest(a, lo_index), max=_kth_smallest(a, hi_index))
        intra = torch.exp(n * (_minmax(a).square() - 1.0))
        beta = intra * torch.tanh(x * total)
        del intra
        cut, top = _kth_smallest(beta, cut_index), beta.max()
        if bool(top > cut):
            scale = (beta.clamp(min=cut) - cut) / (top - cut)
        else:
            scale = torch.zeros_like(beta)
        del beta
        numerator += wi * scale * torch.sign(x) * a
        denominator += scale
    return (numerator / denominator.clamp(min=1e-12)).reshape(shape).to(dtype)


def search_lambda(
    evaluate: Callable[[list[float]], float],
    n_tasks: int,
    *,
    grid: Sequence[float] = DEFAULT_LAMBDA_GRID,
    budget: int = 100,
    seed: int = 0,
    init: float = 1.0,
) -> tuple[list[float], float]:
    """Search per-task scales lambda_i that maximise ``evaluate(lambdas)``.

    The PCB reference (duguodong7/pcb-merging) searches lambda in [0.8, 1.3]^n with nevergrad's
    NGOpt for 100 evaluations. This is a simpler, dependency-free coordinate search on a grid:
    start from ``[init] * n``; in each round visit the tasks in a seeded random order and, for
    each, try every grid value with the others fixed, keeping a value only if it raises the score
    strictly; stop after a round without improvement or after ``budget`` evaluations. A lambda
    vector already scored is not evaluated again. Higher scores are better (pass e.g. minus a
    loss).

    Args:
        evaluate: scores a list of ``n_tasks`` lambdas (e.g. validation accuracy of
            ``base + pcb(tvs, weights=lambdas)``); must return a finite number.
        n_tasks: number of tasks.
        grid: candidate values for each lambda (default 0.8, 0.9, ..., 1.3).
        budget: most evaluations, counting the starting point.
        seed: seeds the order in which tasks are visited.
        init: starting value of every lambda.

    Returns:
        ``(best_lambdas, best_score)``.
    """
    from ..progress import bar as progress_bar

    if not callable(evaluate):
        raise ConfigError("search_lambda: evaluate must be a function of a list of lambdas.")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ConfigError(f"search_lambda: n_tasks must be a positive integer, got {n_tasks!r}.")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"search_lambda: budget must be a positive integer, got {budget!r}.")
    try:
        values = sorted({float(g) for g in grid})
        init = float(init)
    except (TypeError, ValueError):
        raise ConfigError(f"search_lambda: grid must be a list of numbers, got {grid!r}.") from None
    if not values or not all(math.isfinite(v) for v in values) or not math.isfinite(init):
        raise ConfigError(
            f"search_lambda: grid must be a non-empty list of finite numbers, got {grid!r}."
        )

    seen: dict[tuple[float, ...], float] = {}
    bar = progress_bar(total=budget, desc="lambda search", unit="eval")

    def score(lams: list[float]) -> float:
        key = tuple(lams)
        if key not in seen:
            s = evaluate(list(lams))
            try:
                s = float(s)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"search_lambda: evaluate returned {s!r}; it must return a number."
                ) from None
            if not math.isfinite(s):
                raise ConfigError(
                    f"search_lambda: evaluate returned {s} for lambdas {lams}; it must return "
                    "a finite score."
                )
            seen[key] = s
            bar.update(1)
        return seen[key]

    rng = random.Random(seed)
    best = [init] * n_tasks
    best_score = score(best)
    try:
        improved = True
        while improved and len(seen) < budget:
            improved = False
            order = list(range(n_tasks))
            rng.shuffle(order)
            for i in order:
                for v in values:
                    if len(seen) >= budget:
                        break
                    cand = list(best)
                    cand[i] = v
                    s = score(cand)
                    if s > best_score:
                        best, best_score, improved = cand, s, True
    finally:
        bar.close()
    return best, best_score


def _dare_linear(
    tvs: Sequence[Tensor],
    *,
    density: float,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """DARE followed by a weighted sum: :func:`dare` with ``combine="linear"``."""
    return dare(tvs, density=density, weights=weights, combine="linear", generator=generator, seed=seed)


def _dare_ties(
    tvs: Sequence[Tensor],
    *,
    density: float,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    majority_sign: str = "total",
) -> Tensor:
    """DARE followed by TIES sign election and disjoint mean: :func:`dare` with ``combine="ties"``."""
    return dare(
        tvs,
        density=density,
        weights=weights,
        combine="ties",
        generator=generator,
        seed=seed,
        majority_sign=majority_sign,
    )


METHODS: dict[str, Callable[..., Tensor]] = {
    "task_arithmetic": task_arithmetic,
    "weighted_average": weighted_average,
    "ties": ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "pcb": pcb,
}
