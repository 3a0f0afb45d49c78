"""`paretune bench`: sweep methods x budgets x seeds, store every run, report the Pareto frontier.

    paretune bench --quick                                   # MiniLM-L6 on city-continent, < 10 min on CPU
    paretune bench --task country-capital --budget 100000 --budget 1000000 --seeds 0,1,2
    paretune bench --out bench-out --report-only             # rebuild the report from runs.sqlite

Writes OUT/runs.sqlite (every run: see paretune.bench.store), OUT/pareto.png, OUT/report.html
and OUT/runs/<method>-<key>/ (each run's metrics.json). Running the same command again resumes:
finished runs are kept, unfinished and failed ones are run again.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import typer

from ..errors import ParetuneError

ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` -> [0, 1, 2]."""
    parts = _split(text)
    if parts is None:
        return None
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ParetuneError(f"--seeds {text!r} is invalid; give integers separated by commas, e.g. --seeds 0,1,2.") from None
    if not seeds:
        raise ParetuneError("--seeds is empty; give at least one seed, e.g. --seeds 0.")
    return list(dict.fromkeys(seeds))


def run_bench(
    *, quick: bool = False, model: str | None = None, task: str | None = None, methods: Sequence[str] | None = None,
    budgets: Sequence[int] = (), seeds: Sequence[int] | None = None, steps: int | None = None,
    lr: float | None = None, batch_size: int | None = None, targets: Sequence[str] | None = None,
    baselines: Sequence[str] | None = None, out: str | Path = "bench-out", report_only: bool = False,
    runner: Callable | None = None, net: Any = None, progress: bool = True,
    echo: Callable[[str], None] = typer.echo,
):
    """What `paretune bench` does, callable from Python (``runner``: see
    :func:`paretune.bench.sweep.run_sweep`; ``net``: the model to count parameters on, instead of
    loading ``model``). Returns ``(SweepResult or None, ReportFiles)``."""
    from . import sweep
    from .report import write_report
    from .store import Store

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParetuneError(f"--out {out} is a file; give a folder (it will hold runs.sqlite and the report).")
    if report_only:
        with Store(out, create=False) as store:
            runs = store.runs()
        if not runs:
            raise ParetuneError(f"{out / 'runs.sqlite'} holds no runs; run the bench first.")
        files = write_report(runs, out, model=model, task=task)
        _print_report(files, echo)
        return None, files

    from ..data.tasks import get_task

    if quick:
        model = model or (sweep.QUICK["model"] if task is None else None)
        task = task or sweep.QUICK["task"]
    if task is None:
        raise ParetuneError("give --task NAME (a built-in task) or --quick.")
    t = get_task(task)
    model = model or t.default_model
    seeds = list(seeds) if seeds is not None else list((sweep.QUICK if quick else sweep.DEFAULTS)["seeds"])
    steps = steps if steps is not None else (sweep.QUICK if quick else sweep.DEFAULTS)["steps"]
    batch_size = batch_size if batch_size is not None else (sweep.QUICK if quick else sweep.DEFAULTS)["batch_size"]
    if not (isinstance(steps, int) and steps >= 1):
        raise ParetuneError(f"--steps {steps!r} is invalid; give an integer >= 1.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ParetuneError(f"--batch-size {batch_size!r} is invalid; give an integer >= 1.")
    if lr is not None and not lr > 0:
        raise ParetuneError(f"--lr {lr!r} is invalid; give a learning rate > 0.")
    for b in budgets:
        if b < 1:
            raise ParetuneError(f"--budget {b} is invalid; give a number of trainable parameters >= 1.")
    names = sweep.resolve_methods(methods)  # unknown method: a clear error before loading anything
    if baselines is None:
        baselines = sweep.BASELINES
    for b in baselines:
        if b not in sweep.BASELINES:
            raise ParetuneError(f"--baselines: unknown baseline {b!r}; choose from {', '.join(sweep.BASELINES)} "
                                "or 'none'.")

    if net is None:
        echo(f"loading {model} to match budgets...")
        net = sweep.load_model_for(model, t.kind)
    budgets = list(dict.fromkeys(budgets))
    if not budgets:
        budgets = _default_budgets(net, names, model, quick, targets)
    plan = sweep.plan_runs(net, model=model, task=task, methods=names, budgets=budgets, seeds=seeds, steps=steps,
                           batch_size=batch_size, lr=lr, targets=targets, baselines=baselines,
                           max_eval=sweep.QUICK["max_eval"] if quick else None,
                           head_lr=sweep.DEFAULT_LR["head"] if lr is None and t.kind == "classification" else None)
    del net
    for note in plan.notes:
        echo(f"note: {note}")
    if not plan.runs:
        raise ParetuneError("nothing to run: every method was skipped (see the notes above).")
    methods_in = list(dict.fromkeys(r.method for r in plan.runs))
    echo(f"bench: {model} on {task}; {len(plan.runs)} run(s) ({', '.join(methods_in)}); budgets "
         f"{', '.join(f'{b:,}' for b in budgets) or '-'}; seeds {','.join(map(str, seeds))}; {steps} steps, "
         f"batch {batch_size}; results in {out / 'runs.sqlite'}")
    out.mkdir(parents=True, exist_ok=True)
    with Store(out) as store:
        result = sweep.run_sweep(plan.runs, store, out, runner=runner, progress=progress)
        runs = store.runs()
    files = write_report(runs, out, model=model, task=task, notes=plan.notes)
    _print_report(files, echo)
    if result.failed:
        echo(f"{len(result.failed)} run(s) failed (recorded in runs.sqlite; rerun the command to retry them):")
        for spec, message in result.failed:
            last = message.strip().splitlines()[-1] if message.strip() else message
            echo(f"  {spec.label}: {last[:300]}")
    return result, files


def _default_budgets(net, names: list[str], model: str, quick: bool, targets) -> list[int]:
    """Without --budget: the quick budgets on MiniLM, else the counts of the first method with a
    size knob at its knob values 2 and 8 (LoRA: r=2 and r=8)."""
    from ..core import registry
    from . import sweep
    from .budget import budgets_for_knob_values, knob_of

    if quick and model == sweep.QUICK["model"] and not targets:
        return list(sweep.QUICK["budgets"])
    for m in names:
        if m in sweep.BASELINES or not knob_of(registry.get(m)):
            continue
        try:
            return budgets_for_knob_values(net, m, sweep.DEFAULTS["knob_values"], targets)
        except ParetuneError:
            continue
    return []


def _print_report(files, echo: Callable[[str], None]) -> None:
    echo("")
    echo(files.table)
    s = files.summary
    if s.failed:
        echo(f"failed runs ({len(s.failed)}):")
        for r in s.failed:
            err = (r["error"] or "").strip().splitlines()
            echo(f"  {r['method']} {r['options']} seed={r['seed']}: {err[-1][:300] if err else 'unknown error'}")
    if s.unfinished:
        echo(f"{len(s.unfinished)} run(s) unfinished (interrupted); run the same command again to finish them.")
    if s.others:
        echo("the store also holds: " + ", ".join(f"{m} on {t}" for m, t in s.others)
             + " (report them with --report-only --model M --task T)")
    echo("")
    if files.png:
        echo(f"plot:    {files.png}")
    echo(f"report:  {files.html}")
    echo(f"results: {files.html.parent / 'runs.sqlite'}")


@contextmanager
def resumable(out: Path) -> Iterator[None]:
    """Around a command that fills ``out/runs.sqlite``: bad input prints ``error: ...`` and exits 2;
    Ctrl-C says the finished runs are kept and exits 130."""
    try:
        yield
    except ParetuneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(ERROR_EXIT)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished runs are kept in {out / 'runs.sqlite'}. Run the same command again "
                   "to resume.", err=True)
        raise typer.Exit(INTERRUPTED_EXIT)


def bench_command(
    quick: bool = typer.Option(False, "--quick", help="MiniLM-L6 on city-continent, every method, budget 70,000 "
                               "(LoRA r=2), 1 seed, 150 steps, 2,000 eval examples: minutes on a CPU"),
    model: Optional[str] = typer.Option(None, "--model", help="minilm-l6 | smollm2-135m | a local path "
                                        "(default: the task's model)"),
    task: Optional[str] = typer.Option(None, "--task", help="built-in task: city-continent, city-country, "
                                       "country-capital, country-currency"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list of methods (default: every "
                                          "registered method that fits the model)"),
    budget: List[int] = typer.Option([], "--budget", help="trainable-parameter budget, repeatable "
                                     "(default: LoRA's count at r=2 and r=8)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma list of seeds, e.g. 0,1,2 (default 0)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps per run (quick: 150, else 300)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate for every run (default per method: "
                                       "adapters 2e-3, head 5e-3, full 1e-4)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch size (default 32)"),
    targets: Optional[str] = typer.Option(None, "--targets", help="comma list of module names/suffixes to adapt "
                                          "(default all-linear)"),
    baselines: str = typer.Option("head,full", "--baselines", help="baselines to run once per seed: head, full, "
                                  "or 'none'"),
    out: Path = typer.Option(Path("bench-out"), "--out", help="output folder: runs.sqlite, pareto.png, report.html"),
    report_only: bool = typer.Option(False, "--report-only", help="rebuild the report from OUT/runs.sqlite; "
                                     "train nothing"),
) -> None:
    """Sweep methods x budgets x seeds on a model and task; report quality per parameter (Pareto)."""
    import sys

    with resumable(out):
        run_bench(
            quick=quick, model=model, task=task, methods=_split(methods), budgets=list(budget),
            seeds=parse_seeds(seeds), steps=steps, lr=lr, batch_size=batch_size, targets=_split(targets),
            baselines=[] if baselines.strip().lower() in ("", "none") else _split(baselines),
            out=out, report_only=report_only, progress=sys.stderr.isatty(),
        )
