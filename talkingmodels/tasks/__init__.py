"""Benchmark tasks. Importing this package registers all of them."""

from talkingmodels.tasks import custom, lm, movielens, text, vision  # noqa: F401
from talkingmodels.tasks.base import Prepared, Task, TaskConfig
from talkingmodels.tasks.registry import TASKS, benchmarks, get_task, register

__all__ = ["TASKS", "Prepared", "Task", "TaskConfig", "benchmarks", "get_task", "register"]
