"""Built-in synthetic tasks with a gold reward: the embedded default data for every stage.

    from rlhfkit.tasks import get_task
    task = get_task("sentiment")
    rows = task.make("preference", n=100, seed=0)           # list of dicts
    task.gold_reward(["the movie was"], [" great ."])       # [0.46...]
    paths = task.write("data/sentiment")                     # every kind, train + eval JSONL

Tasks: `sentiment` (positive review continuation), `arithmetic` (small-integer sums).
Pure Python; no torch, no models.
"""

from __future__ import annotations

import difflib

from rlhfkit.tasks.arithmetic import ArithmeticTask
from rlhfkit.tasks.base import DEFAULT_SIZES, KINDS, Task, sigmoid
from rlhfkit.tasks.sentiment import SentimentTask

TASKS: dict[str, type[Task]] = {
    SentimentTask.name: SentimentTask,
    ArithmeticTask.name: ArithmeticTask,
}


def task_names() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """A fresh instance of the named task. Unknown name: ValueError with the names and a guess."""
    try:
        return TASKS[name]()
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), task_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(task_names())}.{hint}")


__all__ = [
    "DEFAULT_SIZES",
    "KINDS",
    "TASKS",
    "ArithmeticTask",
    "SentimentTask",
    "Task",
    "get_task",
    "sigmoid",
    "task_names",
]
