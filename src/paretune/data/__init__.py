"""Data: built-in tasks made from data that installed packages ship, and user CSV/JSONL files."""

from .examples import Dataset, load_data
from .tasks import TASKS, Task, get_task

__all__ = ["Dataset", "load_data", "Task", "TASKS", "get_task"]
