"""Task names to tasks: built-in families, aliases, ``rg:``/``jsonl:`` adapters, options after ``?``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from nanoseek.data.tasks.adapters import JsonlTask, ReasoningGymTask
from nanoseek.data.tasks.base import ChatTurnTask, Task, parse_task_spec, spec_without, typed_options
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
    base, options = parse_task_spec(name.strip(), raw=True)
    if "turn" in options:
        turn = parse_task_spec(name.strip())[1]["turn"]  # ChatTurnTask says what a turn must be
        return ChatTurnTask(name, get_task(spec_without(name.strip(), "turn")), turn)
    if base.startswith("rg:"):
        typed = typed_options(ReasoningGymTask, base, options, given=("spec", "dataset"))
        return ReasoningGymTask(name, base[3:], **typed)
    if base.startswith("jsonl:"):
        return JsonlTask(name, base[6:], **typed_options(JsonlTask, base, options, given=("spec", "path")))
    if base in TASK_ALIASES:
        base, defaults = parse_task_spec(TASK_ALIASES[base], raw=True)
        options = {**defaults, **options}
    if base not in TASKS:
        raise ValueError(
            f"unknown task {base!r}; built-in: {', '.join([*TASKS, *TASK_ALIASES])}; or rg:<name>, jsonl:<path>"
        )
    factory = TASKS[base]
    typed = typed_options(factory, base, options)
    try:
        return factory(spec=name, **typed)
    except TypeError as e:
        raise ValueError(f"bad options for task {base!r}: {e}") from e
