"""Task names to tasks: built-in families, aliases, ``rg:``/``jsonl:`` adapters, options after ``?``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from nanoseek.data.tasks.adapters import JsonlTask, ReasoningGymTask
from nanoseek.data.tasks.base import Task
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


def _parse_value(v: str) -> Any:
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"arithmetic?digits=3&ops=add,sub"`` -> ("arithmetic", {"digits": 3, "ops": "add,sub"})."""
    base, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise ValueError(f"bad task option {part!r} in {spec!r}; expected key=value")
        options[k] = _parse_value(v)
    return base, options


def in_unseen_wordings(spec: str) -> str:
    """The spec of the same held-out problems phrased as training never phrased them (built-in
    families: `BuiltinTask.UNSEEN_WORDINGS`)."""
    return f"{spec}{'&' if '?' in spec else '?'}wording=unseen"


def is_unseen_wordings(spec: str) -> bool:
    return parse_task_spec(spec)[1].get("wording") == "unseen"


@functools.lru_cache(maxsize=64)
def get_task(name: str) -> Task:
    """A task by spec: a built-in name, ``rg:<dataset>``, or ``jsonl:<path>``, options after ``?``."""
    base, options = parse_task_spec(name.strip())
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
