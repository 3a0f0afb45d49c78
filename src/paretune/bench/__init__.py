"""Benchmarking: sweep methods x parameter budgets x seeds, store every run in SQLite, and report
which method buys the most quality per parameter (`paretune bench`, docs/bench.md).

    budget.py   match_budget: the method's size knob (LoRA's r) closest to a trainable budget
    tuning.py   per-method bench settings: size knob, how far to scan it, learning rate
    store.py    the SQLite results store (schema in its docstring), resumable
    sweep.py    the run list and the runner (one `paretune train` subprocess per run)
    report.py   pareto_front, the terminal table, the Pareto PNG, the self-contained HTML page
    cli.py      `paretune bench`
"""

from .budget import BudgetError, match_budget, plan_budget, trainable_count
from .report import pareto_front, write_report
from .store import Store

__all__ = ["match_budget", "plan_budget", "trainable_count", "BudgetError", "pareto_front", "write_report", "Store"]
