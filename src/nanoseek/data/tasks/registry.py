"""Task names to tasks: built-in families, aliases, ``rg:``/``jsonl:`` adapters, options after ``?``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from nanoseek.data.tasks.adapters import JsonlTask, ReasoningGymTask
from nanoseek.data.tasks.base import ChatTurnTask, Task, parse_task_spec, spec_without
from nanoseek.data.tasks.families import (
    ArithmeticTask,
    ComparisonTask,
    CountdownTask,
    CountingTask,
    LargestTask,
    LinearEquationTask,
    ModularTask,
    SortingTask,
    WordProblemTask,
)

TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "linear_equation": LinearEquationTask,
    "sorting": SortingTask,
    "comparison": ComparisonTask,
    "counting": CountingTask,
    "largest": LargestTask,
    "modular": ModularTask,
    "word_problem": WordProblemTask,
}
BUILTIN_TASKS: tuple[str, ...] = tuple(TASKS)
# Named settings of a family, for reports and presets: "addition" is arithmetic restricted to +.
TASK_ALIASES: dict[str, str] = {
    "addition": "arithmetic?ops=add",
    "subtraction": "arithmetic?ops=sub",
    "multiplication": "arithmetic?ops=mul&digits=3",  # 3-digit x 2-digit, long multiplication
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Add a task family: ``factory(spec=..., **options)`` must return a Task."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"task names are lowercase identifiers, got {name!r}")
    TASKS[name] = factory
    get_task.cache_clear()


@functools.lru_cache(maxsize=64)
def get_task(name: str) -> Task:
    """A task by spec: a built-in name, ``rg:<dataset>``, or ``jsonl:<path>``, options after ``?``."""
    base, options = parse_task_spec(name.strip())
    if "turn" in options:
        return ChatTurnTask(name, get_task(spec_without(name.strip(), "turn")), options["turn"])
    if base.startswith("rg:"):
        return ReasoningGymTask(name, base[3:], **options)
    if base.startswith("jsonl:"):
        return JsonlTask(name, base[6:], **options)
    if base in TASK_ALIASES:
        base, defaults = parse_task_spec(TASK_ALIASES[base])
        options = {**defaults, **options}
    if base not in TASKS:
        raise ValueError(
            f"unknown task {base!r}; built-in: {', '.join([*TASKS, *TASK_ALIASES])}; or rg:<name>, jsonl:<path>"
        )
    try:
        return TASKS[base](spec=name, **options)
    except TypeError as e:
        raise ValueError(f"bad options for task {base!r}: {e}") from e
