"""Verifiable tasks for R1-style reasoning RL: built-in families, reasoning-gym and JSONL adapters.

Notable:
- Train and held-out ("test") splits never overlap, whatever the seed: a problem's split is decided by a hash
  of its *canonical* form (the math, not the wording: ``47 + 38`` and ``38 + 47`` are one problem, and the
  language or the names in a word problem do not matter), 1 in ``HELDOUT_EVERY`` problems is held out.
- Every built-in family is sized for a tiny model by default (2-digit numbers, short prompts) with a
  ``difficulty`` knob, and writes its prompts in English, Japanese and Chinese.
- Answers come after the last ``</think>``; scoring is strict (one number, one list, one expression):
  an answer stuffed with candidates ("1 2 3 ... 42") is wrong. ``worked_solution`` gives the short
  ``<think>`` trace in the prompt's language used for the corpus, SFT and cold start.
- ``verify`` returns None when the *gold* answer cannot be parsed, so callers skip the sample instead of
  rewarding it (a failure mode of open-r1/TRL setups).
- Task names take options as a query string: ``arithmetic?digits=3&ops=add``, ``rg:countdown?partial=1``.

Modules: ``answers`` (answer extraction, verifiers), ``base`` (Problem, splits, Task), ``families`` (the
built-in families), ``adapters`` (reasoning-gym, JSONL), ``registry`` (``get_task``, task names).
"""

from __future__ import annotations

from nanoseek.data.tasks.adapters import (
    JsonlTask,
    ReasoningGymTask,
    script_counts,  # noqa: F401  (data.rewards imports it from here)
)
from nanoseek.data.tasks.answers import (
    check_code,  # noqa: F401  (data.rewards imports it from here)
    check_exact,
    check_math,
    check_numeric,
    extract_answer,
    parse_number,
)
from nanoseek.data.tasks.base import (
    HELDOUT_EVERY,
    LANGUAGES,
    ChatTurnTask,
    Problem,
    Task,
    as_second_turn,
    check_training_tasks,
    in_unseen_wordings,
    is_later_turn,
    is_unseen_wordings,
    parse_task_spec,
    refuse_unseen_wordings,
    split_of,
)
from nanoseek.data.tasks.families import (
    ArithmeticTask,
    BuiltinTask,
    ComparisonTask,
    CountdownTask,
    CountingTask,
    LargestTask,
    LinearEquationTask,
    ModularTask,
    SortingTask,
    WordProblemTask,
    check_countdown,
)
from nanoseek.data.tasks.registry import (
    BUILTIN_TASKS,
    TASK_ALIASES,
    TASKS,
    get_task,
    prescore,
    register_task,
    registered_tasks,
    split_task_list,
)
from nanoseek.tokenizer import EOS as EOS_TEXT  # noqa: F401  (data.rewards imports the chat strings from here)
from nanoseek.tokenizer import THINK_END, THINK_START  # noqa: F401

__all__ = [
    "BUILTIN_TASKS",
    "HELDOUT_EVERY",
    "LANGUAGES",
    "TASKS",
    "TASK_ALIASES",
    "ArithmeticTask",
    "BuiltinTask",
    "ComparisonTask",
    "CountdownTask",
    "CountingTask",
    "JsonlTask",
    "LargestTask",
    "LinearEquationTask",
    "ModularTask",
    "Problem",
    "ReasoningGymTask",
    "SortingTask",
    "Task",
    "WordProblemTask",
    "check_countdown",
    "check_exact",
    "check_math",
    "check_numeric",
    "extract_answer",
    "get_task",
    "prescore",
    "in_unseen_wordings",
    "as_second_turn",
    "is_later_turn",
    "ChatTurnTask",
    "is_unseen_wordings",
    "parse_number",
    "parse_task_spec",
    "check_training_tasks",
    "refuse_unseen_wordings",
    "register_task",
    "registered_tasks",
    "split_task_list",
    "split_of",
]
