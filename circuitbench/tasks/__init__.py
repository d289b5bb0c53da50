"""Tasks: the behaviours circuits are found for, and the registry that names them.

``TASKS`` maps a task name to a factory (usually the Task class) that takes no arguments.
``get_task(name)`` returns a fresh Task; ``custom:PATH`` builds a task from a user's JSONL file.
A module in this package registers its tasks with ``@register_task("name")``; every module in the
package is imported when the package is, so a new task family is one new file here.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from ..errors import UserError
from .base import Examples, LazySplit, Splits, Task

TASKS: dict[str, Callable[[], Task]] = {}

def register_task(name: str):
    """Class decorator (or plain call on a factory) that registers a task under ``name``."""

    def decorator(factory):
        if name in TASKS and TASKS[name] is not factory:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = factory
        return factory

    return decorator


def task_names() -> list[str]:
    """Names of the registered tasks, in registration order."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; ``custom:PATH`` reads a JSONL file. UserError when unknown."""
    if name.startswith("custom:") or name == "custom":
        path = name[len("custom:"):] if name.startswith("custom:") else ""
        if not path:
            raise UserError("the custom task needs a file: --task custom:PATH.jsonl")
        from .custom import CustomTask

        return CustomTask(path)
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, custom:PATH.jsonl")
    return TASKS[name]()


# Registration happens on import: every module of the package (task families) registers itself.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASKS", "Examples", "LazySplit", "Splits", "Task", "get_task", "register_task", "task_names"]
