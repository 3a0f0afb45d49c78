"""Shared pieces of the bench tests: a tiny random BERT and a fake `paretune train` runner."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def bert():
    return tiny_bert()


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def options_of(argv: list[str]) -> dict:
    out = {}
    for i, a in enumerate(argv):
        if a == "-o":
            k, _, v = argv[i + 1].partition("=")
            out[k] = json.loads(v)
    return out


class FakeRunner:
    """Stands in for `paretune train`: parses the argv and writes a plausible metrics.json.

    ``fail``: methods whose runs exit 1 with a traceback on stderr; ``interrupt_at``: the call
    (1-based) that raises KeyboardInterrupt, as Ctrl-C during a run would.
    """

    def __init__(self, fail=(), interrupt_at: int | None = None, metric: str = "accuracy"):
        self.calls: list[list[str]] = []
        self.fail = set(fail)
        self.interrupt_at = interrupt_at
        self.metric = metric

    def __call__(self, argv):
        self.calls.append(list(argv))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        assert argv[1:4] == ["-m", "paretune.cli", "train"]
        method, seed = arg(argv, "--method"), int(arg(argv, "--seed"))
        if method in self.fail:
            return subprocess.CompletedProcess(argv, 1, "", "Traceback (most recent call last):\n  ...\n"
                                               f"RuntimeError: {method} blew up on purpose")
        opts = options_of(argv)
        r = opts.get("r", 0)
        trainable = {"head": 2_000, "full": 1_000_000}.get(method, 1_000 * r + 2_000)
        quality = {"head": 0.40, "full": 0.80}.get(method, 0.5 + 0.03 * r) + 0.01 * seed
        if method == "pissa":
            quality -= 0.02
        metrics = {
            "method": method, "options": opts, "trainable": trainable, "stored_bytes": 4 * trainable,
            "train_seconds": 1.5 + r / 10, "peak_memory_bytes": 300_000_000 + trainable, "metric": self.metric,
            self.metric: quality, "eval_loss": 1.0 - quality, "steps": int(arg(argv, "--steps")), "seed": seed,
        }
        out = Path(arg(argv, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(argv, 0, "done\n", "")


@pytest.fixture
def fake_runner():
    """The FakeRunner class (call it with fail=..., interrupt_at=...)."""
    return FakeRunner


@pytest.fixture
def make_bert():
    return tiny_bert


@pytest.fixture
def route_runs(monkeypatch):
    """``route_runs(runner)``: every sweep of the CLI goes to ``runner`` (never a real worker)."""
    from paretune.bench import sweep

    def use(runner):
        real = sweep.run_sweep
        monkeypatch.setattr(sweep, "run_sweep", lambda *a, runner=None, **k: real(*a, runner=use.runner, **k))
        use.runner = runner
        return runner
    return use


@pytest.fixture
def app():
    """A typer app whose only command is ``paretune bench``."""
    import typer

    from paretune.bench.cli import bench_command

    a = typer.Typer()
    a.command()(bench_command)
    return a

