"""Task names to tasks: built-in families, aliases, ``rg:``/``jsonl:`` adapters, options after ``?``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

from nanoseek.data.tasks.adapters import JsonlTask, ReasoningGymTask
from nanoseek.data.tasks.base import ChatTurnTask, Problem, Task, parse_task_spec, spec_without, typed_options
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
_BUILTIN_FACTORIES = dict(TASKS)
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
    _cached_task.cache_clear()


def registered_tasks() -> dict[str, Callable[..., Task]]:
    """The families `register_task` added (or put in a built-in's place) in this process: a spawned one
    (the speedrun's) starts from the built-in ones and registers these again."""
    return {name: f for name, f in TASKS.items() if _BUILTIN_FACTORIES.get(name) is not f}


def get_task(name: str, reread: bool = True) -> Task:
    """A task by spec: a built-in name, ``rg:<dataset>``, or ``jsonl:<path>``, options after ``?``.
    Built once per process; a ``jsonl:`` task is built again once its files changed on disk (a
    notebook that edits its problems and evaluates again scored the problems it read first).
    `reread=False`: the task as built, whatever its files hold now, to score a problem it gave (GRPO's
    rewards, per sample: an edit to the file mid-run is not read into the run, nor an error in it)."""
    task = _cached_task(name)
    # (a registered factory's object may not be a Task)
    if reread and getattr(task, "changed_on_disk", bool)():
        _cached_task.cache_clear()
        task = _cached_task(name)
    return task


@functools.lru_cache(maxsize=64)
def _cached_task(name: str) -> Task:
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
        from nanoseek.options import close_one

        meant = close_one(base, [*TASKS, *TASK_ALIASES])
        raise ValueError(
            f"unknown task {base!r}{f' (did you mean {meant!r}?)' if meant else ''}; built-in: "
            f"{', '.join([*TASKS, *TASK_ALIASES])}; or rg:<name>, jsonl:<path>"
        )
    factory = TASKS[base]
    typed = typed_options(factory, base, options)
    try:
        return factory(spec=name, **typed)
    except TypeError as e:
        raise ValueError(f"bad options for task {base!r}: {e}") from e


def prescore(problems: Sequence[Problem], completions: Sequence[str]) -> None:
    """Score the reasoning-gym answers among these ahead of the ``verify`` calls that read them one by
    one: one sandboxed child per task for them all (``ReasoningGymTask.prescore``), not one per answer."""
    by_task: dict[str, tuple[list[Problem], list[str]]] = {}
    for p, c in zip(problems, completions, strict=True):
        name = getattr(p, "task", None)
        if isinstance(name, str) and name.startswith("rg:") and p.meta.get("entry") is not None:
            ps, cs = by_task.setdefault(name, ([], []))
            ps.append(p)
            cs.append(c)
    for name, (ps, cs) in by_task.items():
        task = get_task(name, reread=False)
        task = getattr(task, "inner", task)  # rg:...?turn=N scores as its dataset does
        if isinstance(task, ReasoningGymTask):
            task.prescore(ps, cs)


get_task.cache_clear = _cached_task.cache_clear  # type: ignore[attr-defined]  # (register_task, tests)


def split_task_list(spec: str | Sequence[str]) -> list[str]:
    """ "arithmetic?ops=add,sub,countdown" -> ["arithmetic?ops=add,sub", "countdown"].

    Task options may hold commas, so a comma inside a task's options starts a new task only when what
    follows names a task (a built-in family, rg:..., jsonl:...). Each of `spec`'s items (a repeated
    --task) starts a task of its own, and a task without options (but a JSONL path) takes no comma's
    piece: an unknown name stays its own, and is refused by that name.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        first = True
        for piece in item.split(","):
            piece = piece.strip()
            if not piece:
                continue
            base = piece.partition("?")[0]
            named = base in TASKS or base in TASK_ALIASES
            # a JSONL path may hold a comma; a family's name may not
            bare = "?" not in out[-1] and not out[-1].startswith("jsonl:") if out else True
            if first or named or base.startswith(("rg:", "jsonl:")) or "?" in piece or bare:
                out.append(piece)
            else:
                out[-1] += "," + piece
            first = False
    out = [t for t in out if t]
    if not out:
        raise ValueError("no task given")
    return out
