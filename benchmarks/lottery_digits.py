"""Lottery tickets on scikit-learn's digits: iterative magnitude pruning of a 64-200-200-10 MLP,
rewinding to θ0 (Frankle & Carbin 2019) against continuing from the trained weights and against a
random reinitialisation each round.

    uv run python benchmarks/lottery_digits.py --out lottery_digits  # writes .md and .png

Setup: the fixed train/test split of :mod:`paretune.measure.digits` (1,438 / 359 images) and its
DigitsMLP; every layer (the output layer too) loses 20% of its remaining weights per round
(layer-wise, as the paper does for its fully connected network, which prunes the output layer at
half that rate); each round trains with Adam (lr 1.2e-3, the paper's Lenet rate) for a fixed number
of epochs, batch 64, and reports test accuracy at the end of training (the paper also reports the
early-stopping iteration; not done here). Several seeds (each seed its own θ0 and data order);
the table gives mean and min..max over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from paretune.compress.lottery import iterative_magnitude_pruning
from paretune.core.atomic import atomic_write_text
from paretune.measure.digits import DigitsMLP, accuracy, load_split

MODES = {"init": "rewind to θ0 (winning ticket)", "none": "continue from trained (prune + fine-tune)",
         "reinit": "random reinit each round"}


def make_train(split, epochs: int, lr: float, batch: int, seed: int):
    def train(model, on_step):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        n, step = len(split.x_train), 0
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch):
                rows = perm[i:i + batch]
                opt.zero_grad()
                F.cross_entropy(model(split.x_train[rows]), split.y_train[rows]).backward()
                opt.step()
                step += 1
                on_step(step)
        model.eval()
        return accuracy(model, split.x_test, split.y_test)
    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1.2e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="lottery_digits", help="output path without suffix (.md and .png are written)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_split()
    t0 = time.perf_counter()
    runs: dict[str, list] = {m: [] for m in MODES}
    for mode in MODES:
        for seed in range(args.seeds):
            res = iterative_magnitude_pruning(DigitsMLP, make_train(split, args.epochs, args.lr, 64, seed),
                                              args.rounds, args.fraction, rewind=mode, seed=seed, progress=True)
            runs[mode].append(res.rounds)
    seconds = time.perf_counter() - t0

    fractions = [r.fraction_remaining for r in runs["init"][0]]
    lines = [f"| round | weights remaining | {' | '.join(MODES[m] for m in MODES)} |",
             "|---:|---:|" + "---:|" * len(MODES)]
    stats = {m: [] for m in MODES}
    for i, frac in enumerate(fractions):
        cells = []
        for m in MODES:
            accs = [rounds[i].accuracy for rounds in runs[m]]
            stats[m].append(accs)
            cells.append(f"{statistics.mean(accs):.4f} ({min(accs):.4f}..{max(accs):.4f})")
        lines.append(f"| {i} | {100 * frac:.1f}% ({runs['init'][0][i].remaining_weights}) | {' | '.join(cells)} |")
    table = "\n".join(lines)
    cmd = ("uv run python benchmarks/lottery_digits.py " + f"--rounds {args.rounds} --fraction {args.fraction} "
           f"--epochs {args.epochs} --lr {args.lr} --seeds {args.seeds} --out {args.out}")
    md = (f"# Lottery tickets on digits (64-200-200-10 MLP)\n\nCommand: `{cmd}`\n\n"
          f"Wall time: {seconds:.1f} s on CPU (torch threads: 1). Test accuracy (359 images), mean "
          f"(min..max) over {args.seeds} seeds; {100 * args.fraction:.0f}% of each layer's remaining weights "
          f"pruned per round; {args.epochs} epochs of Adam (lr {args.lr}, batch 64) per round.\n\n{table}\n")
    print(md)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in MODES:
        means = [statistics.mean(a) for a in stats[m]]
        lo = [min(a) for a in stats[m]]
        hi = [max(a) for a in stats[m]]
        ax.plot([100 * f for f in fractions], means, marker="o", label=MODES[m])
        ax.fill_between([100 * f for f in fractions], lo, hi, alpha=0.15)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Iterative magnitude pruning, digits MLP 64-200-200-10")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    png = out.with_suffix(".png")
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(png)
    atomic_write_text(out.with_suffix(".md"), md)
    print(f"wrote {png} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
