"""The scikit-learn digits task and the small MLP that intrinsic-dimension measurements train on it.

* Data: :func:`sklearn.datasets.load_digits` (1,797 8x8 grey-level images of the digits 0-9,
  bundled with scikit-learn, no download). Features are the 64 pixels divided by 16 (the pixel
  range is 0..16), so every feature lies in [0, 1].
* Split: fixed, whatever the run's seed: a permutation of the 1,797 indices drawn from a
  ``torch.Generator`` seeded with :data:`SPLIT_SEED`; its first 20% (359 images) are the test
  split, the rest (1,438) the training split. The two are disjoint by construction.
* Model: :class:`DigitsMLP`, 64-200-200-10 with ReLU: the fully connected network of Li et al.
  (2018), "Measuring the Intrinsic Dimension of Objective Landscapes" (two hidden layers of 200
  for MNIST), with the input shrunk to the 64 pixels. θ0 is its random initialisation under a
  seed (PyTorch's default ``nn.Linear`` init), as in the paper, which trains from scratch inside
  the random subspace.
* Training (:func:`train_digits`): AdamW with weight decay 0, cross-entropy, a fixed number of
  optimizer steps of a fixed batch size, the peak learning rate scaled by
  :func:`paretune.training.schedule.lr_factor` (linear warm-up over the first 6% of the steps,
  then linear decay to zero, as the trainer does). Each epoch visits the training split in a fresh
  order drawn from the seed. Metric: accuracy on the test split.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ParetuneError

MODEL_NAME = "digits-mlp"
TASK_NAME = "digits"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
HIDDEN = (200, 200)
N_CLASSES = 10
N_FEATURES = 64
TARGETS = ("fc1", "fc2", "fc3")  # every Linear layer, the output layer included
WARMUP = 0.06  # fraction of the steps, as paretune.training.trainer.train


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """The fixed train/test split of scikit-learn's digits: features in [0, 1], integer labels."""

    x_train: torch.Tensor  # (n_train, 64) float32
    y_train: torch.Tensor  # (n_train,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor  # rows of load_digits() in each split
    test_index: torch.Tensor


def load_split(test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """The digits data, split by a permutation seeded with :data:`SPLIT_SEED` (test: the first
    ``round(test_fraction * 1797)`` indices of the permutation)."""
    if not 0 < test_fraction < 1:
        raise ParetuneError(f"test_fraction={test_fraction!r}: give a fraction strictly between 0 and 1.")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(test_fraction * len(x)))
    test_index, train_index = perm[:n_test].sort().values, perm[n_test:].sort().values
    return DigitsSplit(x[train_index], y[train_index], x[test_index], y[test_index], train_index, test_index)


class DigitsMLP(nn.Module):
    """64-200-200-10 with ReLU (Li et al. 2018's FC network, on 8x8 digits)."""

    def __init__(self, hidden: Sequence[int] = HIDDEN, n_in: int = N_FEATURES, n_out: int = N_CLASSES):
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(n_in, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_mlp(seed: int = 0) -> DigitsMLP:
    """A :class:`DigitsMLP` initialised from ``seed`` alone (θ0); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsMLP()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    was = model.training
    model.eval()
    try:
        right = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                    for i in range(0, len(x), batch_size))
    finally:
        model.train(was)
    return right / max(1, len(x))


def train_digits(
    model: nn.Module, split: DigitsSplit, *, method: str, options: dict[str, Any] | None = None,
    targets: Sequence[str] = TARGETS, steps: int = 1000, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
    warmup: float = WARMUP, schedule: str = "linear", progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on the training split and return its metrics (the test accuracy, the
    trainable count, the training seconds, the final training loss).

    ``method``: ``"full"`` trains every parameter; any other name is adapted first with
    ``paretune.adapt(model, method, targets=list(targets), **options)`` and then only the
    method's parameters train (e.g. ``"subspace"`` with ``dim``).
    """
    from ..api import adapt
    from ..training.schedule import lr_factor

    if not (isinstance(steps, int) and steps >= 1):
        raise ParetuneError(f"steps={steps!r}: give an integer >= 1.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ParetuneError(f"batch_size={batch_size!r}: give an integer >= 1.")
    if not lr > 0:
        raise ParetuneError(f"lr={lr!r}: give a learning rate > 0.")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapt(model, method, targets=list(targets), **dict(options or {}))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ParetuneError(f"nothing to train: method {method!r} left no parameter trainable.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup_steps = int(math.ceil(warmup * steps)) if warmup < 1 else int(warmup)
    n = len(split.x_train)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    pos = 0
    history: list[float] = []
    bar = None
    if progress:
        from ..progress import bar as progress_bar

        bar = progress_bar(total=steps, desc=f"train {method}", unit="step", leave=False)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rows = []
        while len(rows) < batch_size:  # a fresh permutation each epoch
            if pos == n:
                order, pos = torch.randperm(n, generator=g), 0
            take = min(batch_size - len(rows), n - pos)
            rows.append(order[pos:pos + take])
            pos += take
        idx = torch.cat(rows)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup_steps, schedule)
        loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        if not torch.isfinite(loss):
            raise ParetuneError(f"{method} diverged at step {step + 1} of {steps} (loss {float(loss)}); "
                                f"lower the learning rate (lr={lr:g}).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return {
        "metric": "accuracy",
        "accuracy": accuracy(model, split.x_test, split.y_test),
        "train_loss": sum(history[-10:]) / len(history[-10:]),
        "trainable": sum(p.numel() for p in params),
        "train_seconds": train_seconds,
        "steps": steps,
        "train_examples": n,
        "eval_examples": len(split.x_test),
    }
