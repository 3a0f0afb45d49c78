"""`paretune bench`: sweep methods x budgets x seeds, store every run, report the Pareto frontier.

    paretune bench --quick                                   # MiniLM-L6 on city-continent, < 10 min on CPU
    paretune bench --task country-capital --budget 100000 --budget 1000000 --seeds 0,1,2
    paretune bench --out bench-out --report-only             # rebuild the report from runs.sqlite
    paretune bench --model minilm-l6 --data train.csv --eval-data test.csv --budget 70000 --seeds 0,1,2
    paretune bench --task city-continent --budget 70000 --tune lr --seeds 0,1,2

Writes OUT/runs.sqlite (every run: see paretune.bench.store), OUT/pareto.png, OUT/report.html
and OUT/runs/<method>-<key>/ (each run's metrics.json). Running the same command again resumes:
finished runs are kept, unfinished and failed ones are run again.
"""

from __future__ import annotations

import contextlib
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
    echo: Callable[[str], None] = typer.echo, data: str | Path | None = None, eval_data: str | Path | None = None,
    tune: str | None = None, tune_grid: Sequence[float] | None = None, tune_seeds: Sequence[int] | None = None,
    executor: str = "sequential", workers: int = 1, address: str | None = None,
):
    """What `paretune bench` does, callable from Python (``runner``: see
    :func:`paretune.bench.sweep.run_sweep`; ``net``: the model to count parameters on, instead of
    loading ``model``). ``data`` / ``eval_data``: the user's files instead of a built-in task
    (:mod:`paretune.bench.data`); ``tune="lr"``: search each configuration's rate on the validation
    split first (:mod:`paretune.bench.tune`; ``tune_grid`` factors, ``tune_seeds`` None = the first
    seed). ``targets``: the ``--targets`` values (see :func:`paretune.cli_options.parse_targets`).
    Holds ``OUT/.lock`` from before the first write into ``out`` to the end
    (:func:`paretune.bench.store.bench_lock`): a second bench on the same folder is a ParetuneError
    "another bench is running in OUT (pid N)" (`paretune bench` then exits 2). Returns ``(SweepResult or None, ReportFiles)``: the final runs' sweep result (with
    ``search``, the search sweep's result, as an attribute when tuning)."""
    from . import sweep
    from .report import write_report
    from .store import Store

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParetuneError(f"--out {out} is a file; give a folder (it will hold runs.sqlite and the report).")
    if data is not None and (model is None) and not report_only:
        raise ParetuneError("--data needs --model (a bundled name such as minilm-l6 / smollm2-135m, a local "
                            "folder or a Hub id).")
    if report_only:
        with Store(out, create=False) as store:
            runs = store.runs()
        if not runs:
            raise ParetuneError(f"{out / 'runs.sqlite'} holds no runs; run the bench first.")
        files = write_report(runs, out, model=model, task=task)
        _print_report(files, echo)
        return None, files

    from ..cli_options import parse_targets
    from .store import bench_lock

    held = contextlib.ExitStack()  # OUT/.lock, from the first write into out to the end
    with held:
        from ..data.tasks import get_task
        from . import tune as tuning
        from .data import prepare_task_search, prepare_user_data

        if eval_data is not None and data is None:
            raise ParetuneError("--eval-data needs --data (the training file).")
        if data is not None and task is not None:
            raise ParetuneError("give either --task NAME (a built-in task) or --data FILE (your own data), not both.")
        tune = tuning.parse_tune(tune)
        factors = tuple(tune_grid) if tune_grid is not None else tuning.DEFAULT_FACTORS
        if quick and data is None:
            model = model or (sweep.QUICK["model"] if task is None else None)
            task = task or sweep.QUICK["task"]
        if data is None and task is None:
            raise ParetuneError("give --task NAME (a built-in task), --data FILE (your own data) or --quick.")
        splits = None
        if data is not None:
            if not model:
                raise ParetuneError("--data needs --model (a bundled name such as minilm-l6 / smollm2-135m, a local "
                                    "folder or a Hub id).")
            if out.exists() and not out.is_dir():
                raise ParetuneError(f"--out {out} is a file; give a folder.")
            held.enter_context(bench_lock(out))  # before the first write into out
            splits = prepare_user_data(Path(data).resolve(), Path(eval_data).resolve() if eval_data else None, out)
            task, kind = splits.name, splits.kind
            echo(f"data: {splits.describe()}")
        else:
            t = get_task(task)
            model = model or t.default_model
            kind = t.kind
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
        if tune_seeds is not None and not tune:
            raise ParetuneError("--tune-seeds needs --tune lr.")
        targets = parse_targets(targets)  # a bad --targets: a clear error before loading anything
        names = sweep.resolve_methods(methods)  # unknown method: a clear error before loading anything
        if baselines is None:
            baselines = sweep.BASELINES
        for b in baselines:
            if b not in sweep.BASELINES:
                raise ParetuneError(f"--baselines: unknown baseline {b!r}; choose from {', '.join(sweep.BASELINES)} "
                                    "or 'none'.")

        if data is None:  # with --data, taken before the split files were written
            held.enter_context(bench_lock(out))
        if net is None:
            echo(f"loading {model} to match budgets...")
            net = sweep.load_model_for(model, kind)
        budgets = list(dict.fromkeys(budgets))
        if not budgets:
            budgets = _default_budgets(net, names, model, quick, targets)
        plan = sweep.plan_runs(net, model=model, task=task, methods=names, budgets=budgets, seeds=seeds, steps=steps,
                               batch_size=batch_size, lr=lr, targets=targets, baselines=baselines,
                               max_eval=sweep.QUICK["max_eval"] if quick else None,
                               head_lr=sweep.HEAD_LR if lr is None and kind == "classification" else None,
                               data=splits.train if splits else None, eval_data=splits.test if splits else None,
                               data_id=splits.data_id if splits else None)
        del net
        for note in plan.notes:
            echo(f"note: {note}")
        if not plan.runs:
            raise ParetuneError("nothing to run: every method was skipped (see the notes above).")
        methods_in = list(dict.fromkeys(r.method for r in plan.runs))
        echo(f"bench: {model} on {task}; {len(plan.runs)} run(s) ({', '.join(methods_in)}); budgets "
             f"{', '.join(f'{b:,}' for b in budgets) or '-'}; seeds {','.join(map(str, seeds))}; {steps} steps, "
             f"batch {batch_size}; results in {out / 'runs.sqlite'}")
        final_runs = plan.runs
        search_result = None
        ex = None
        if runner is None:  # one set of workers for the search and the final runs (the model loads once)
            from .executors import make_executor

            ex = make_executor(executor, workers, address)
        with Store(out) as store, _closing(ex):
            if tune:
                if splits is None:
                    splits = prepare_task_search(task, out)
                search = tuning.search_runs(plan.runs, splits, factors, tune_seeds)
                echo(f"tune lr: {len(search)} search run(s): each configuration at its rate x "
                     f"{', '.join(f'{f:g}' for f in factors)}, seed(s) {','.join(str(x) for x in sorted({r.seed for r in search}))}, "
                     f"trained on {splits.counts['search_train']:,} rows, scored on the {splits.counts['val']:,}-row "
                     "validation split")
                search_result = sweep.run_sweep(search, store, out, runner=runner, progress=progress, executor=ex or executor)
                keys = {r.key for r in search}
                rows = [r for r in store.runs(phase="search") if r["key"] in keys]
                choices = tuning.choose(rows, tuning.default_lrs(plan.runs))
                for line in tuning.describe(choices):
                    echo(f"tune lr: {line}")
                final_runs = tuning.apply(plan.runs, choices)
            result = sweep.run_sweep(final_runs, store, out, runner=runner, progress=progress, executor=ex or executor)
            runs = store.runs()
        if search_result is not None:
            result.search = search_result
            result.failed = list(search_result.failed) + list(result.failed)
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
            return budgets_for_knob_values(net, m, sweep.DEFAULTS["knob_values"], sweep.target_values(targets)[1])
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
def _closing(ex) -> Iterator[None]:
    try:
        yield
    finally:
        if ex is not None:
            ex.close()


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
    quick: bool = typer.Option(False, "--quick", help="MiniLM-L6 on city-continent, every registered method, budget "
                               "70,000 (LoRA r=2), 1 seed, 80 steps of batch 16, the first 500 test examples: under "
                               "10 min on a 2-core CPU for ~40 runs (docs/bench.md)"),
    model: Optional[str] = typer.Option(None, "--model", help="minilm-l6 | smollm2-135m | a local path "
                                        "(default: the task's model)"),
    task: Optional[str] = typer.Option(None, "--task", help="built-in task: city-continent, city-country, "
                                       "country-capital, country-currency"),
    data: Optional[Path] = typer.Option(None, "--data", help="your training data instead of --task: CSV/TSV/JSONL "
                                        "with text,label (classification) or prompt,completion (generation); needs "
                                        "--model"),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="your test data (same columns); default: "
                                             "~20% of --data, chosen by a hash of each row's input"),
    tune: Optional[str] = typer.Option(None, "--tune", help="'lr': per configuration, search the learning rate on a "
                                       "validation split (~10% of the training data) before the final runs"),
    tune_grid: Optional[str] = typer.Option(None, "--tune-grid", help="multipliers of each configuration's default "
                                            "rate to try (default 0.25,0.5,1,2,4)"),
    tune_seeds: Optional[str] = typer.Option(None, "--tune-seeds", help="seeds of the search runs: a comma list or "
                                             "'all' (default: the first of --seeds)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list of methods (default: every "
                                          "registered method that fits the model)"),
    budget: List[int] = typer.Option([], "--budget", help="trainable-parameter budget, repeatable "
                                     "(default: LoRA's count at r=2 and r=8)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma list of seeds, e.g. 0,1,2 (default 0); 2 or more "
                                        "give 95% intervals"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps per run (quick: 100, else 300)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate for every run (default per method: "
                                       "adapters 2e-3, head 5e-3, full 1e-4)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch size (quick: 16, else 32)"),
    targets: List[str] = typer.Option([], "--targets", help="module names/suffixes to adapt, repeatable and/or "
                                      "comma-separated, or one re:PATTERN (default all-linear)"),
    baselines: str = typer.Option("head,full", "--baselines", help="baselines to run once per seed: head, full, "
                                  "or 'none'"),
    out: Path = typer.Option(Path("bench-out"), "--out", help="output folder: runs.sqlite, pareto.png, report.html"),
    report_only: bool = typer.Option(False, "--report-only", help="rebuild the report from OUT/runs.sqlite; "
                                     "train nothing"),
    workers: int = typer.Option(1, "--workers", help="runs at once, each in its own worker process (one per GPU "
                                "when there are several); the model and data load once per worker"),
    executor: str = typer.Option("sequential", "--executor", help="sequential | pool | ray (Ray actors on the "
                                 "cluster at --address; needs paretune[ray])"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address HOST:PORT (with --executor "
                                          "ray; default: start a local Ray)"),
) -> None:
    """Sweep methods x budgets x seeds on a model and task; report quality per parameter (Pareto)."""
    import sys

    from .tune import parse_grid

    with resumable(out):
        seed_list = parse_seeds(seeds)
        if tune_seeds is not None and tune_seeds.strip().lower() == "all":
            t_seeds = list(seed_list) if seed_list is not None else [0]
        else:
            t_seeds = parse_seeds(tune_seeds)
        run_bench(
            quick=quick, model=model, task=task, methods=_split(methods), budgets=list(budget),
            seeds=seed_list, steps=steps, lr=lr, batch_size=batch_size, targets=targets or None,
            baselines=[] if baselines.strip().lower() in ("", "none") else _split(baselines),
            out=out, report_only=report_only, progress=sys.stderr.isatty(), data=data, eval_data=eval_data,
            tune=tune, tune_grid=parse_grid(tune_grid) if tune_grid is not None else None, tune_seeds=t_seeds,
            executor=executor, workers=workers, address=address,
        )
