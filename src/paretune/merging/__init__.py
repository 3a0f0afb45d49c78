"""Merging fine-tuned models and adapters that share a base: task arithmetic, weighted average,
TIES, DARE and PCB on task vectors (fine-tuned minus base weights).

    from paretune.merging import ties
    merged = base + ties([finetuned_a - base, finetuned_b - base], density=0.2)
"""

from .methods import METHODS, dare, pcb, search_lambda, task_arithmetic, ties, weighted_average
from .adapters import merge_adapters
from .models import merge_models, merge_state_dicts
from .recipe import Recipe, load_recipe, run_recipe
