"""`paretune intrinsic-dim`: the intrinsic dimension (d90) of a model on a task.

    paretune intrinsic-dim --model digits-mlp --task digits --dims 10,100,300,1000
    paretune intrinsic-dim --model minilm-l6 --task city-continent --dims 100,1000,10000 --said

Writes OUT/runs.sqlite (every run, in the bench's results store), OUT/intrinsic-dim.png and
OUT/intrinsic-dim.html. Running the same command again reuses the finished runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..bench.cli import resumable


def intrinsic_dim_command(
    dims: str = typer.Option(..., "--dims", help="subspace dimensions, comma separated, e.g. 10,100,1000"),
    model: Optional[str] = typer.Option(None, "--model", help="digits-mlp | minilm-l6 | smollm2-135m | a local path "
                                        "(default: the task's model)"),
    task: str = typer.Option(..., "--task", help="digits (scikit-learn's digits, with digits-mlp) or a built-in "
                             "text task: city-continent, ..."),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps of every run (digits: 1000, text: 300)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate of the subspace runs "
                                       "(digits: 1e-2; text: the bench's default for subspace)"),
    full_lr: Optional[float] = typer.Option(None, "--full-lr", help="peak learning rate of the full run "
                                            "(digits: 1e-3; text: 1e-4)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch size (digits: 64, text: 32)"),
    projection: Optional[str] = typer.Option(None, "--projection", help="random projection: dense | fastfood "
                                             "(default: dense for digits-mlp, fastfood for text models)"),
    said: bool = typer.Option(False, "--said", help="SAID: one trainable scale per adapted layer (Aghajanyan et al.)"),
    seed: int = typer.Option(0, "--seed", help="seed of θ0 (digits-mlp's init, a text model's head), the projection "
                             "and the data order"),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="text tasks: train on the first N examples"),
    max_eval: Optional[int] = typer.Option(None, "--max-eval", help="text tasks: evaluate on the first N held-out "
                                           "examples"),
    out: Path = typer.Option(Path("intrinsic-out"), "--out", help="output folder: runs.sqlite, intrinsic-dim.png, "
                             "intrinsic-dim.html"),
    quiet: bool = typer.Option(False, "--quiet", help="print nothing but errors"),
) -> None:
    """Measure the intrinsic dimension d90 of a model on a task by training in random subspaces."""
    from .intrinsic import intrinsic_dimension

    with resumable(out):
        intrinsic_dimension(model, task, dims, out=out, steps=steps, lr=lr, full_lr=full_lr, batch_size=batch_size,
                            projection=projection, said=said, seed=seed, max_train=max_train, max_eval=max_eval,
                            quiet=quiet, echo=typer.echo)
