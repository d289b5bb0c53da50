"""Tasks: the behaviours circuits are found for, and the registry that names them.

``TASKS`` maps a task name to a factory (usually the Task class) that takes no arguments.
``get_task(name)`` returns a fresh Task; ``custom:PATH.jsonl`` (or a bare path ending in ``.jsonl``)
builds a task from a user's JSONL file.
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


CUSTOM_FORM = "custom:PATH.jsonl"


def canonical_task_name(name: str) -> str:
    """``name`` in the form results are stored under: a bare path ending in ``.jsonl`` becomes
    ``custom:PATH.jsonl``; every other name is returned unchanged."""
    if name not in TASKS and not name.startswith("custom:") and name.lower().endswith(".jsonl"):
        return f"custom:{name}"
    return name


def get_task(name: str) -> Task:
    """The task called ``name``; ``custom:PATH.jsonl`` (or a bare ``PATH.jsonl``) reads a JSONL file.
    UserError when unknown."""
    name = canonical_task_name(name)
    if name.startswith("custom:") or name == "custom":
        path = name[len("custom:"):] if name.startswith("custom:") else ""
        if not path:
            raise UserError(f"the custom task needs a file: --task {CUSTOM_FORM}")
        from .custom import CustomTask

        return CustomTask(path)
    if name not in TASKS:
        hint = ""
        if "/" in name or "\\" in name or "." in name:
            hint = f" (a task file must be a JSONL file: --task {CUSTOM_FORM})"
        raise UserError(f"unknown task {name!r}{hint}; known tasks: {', '.join(sorted(TASKS))}, {CUSTOM_FORM}")
    return TASKS[name]()


# Registration happens on import: every module of the package (task families) registers itself.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CUSTOM_FORM", "TASKS", "Examples", "LazySplit", "Splits", "Task", "canonical_task_name", "get_task",
           "register_task", "task_names"]
