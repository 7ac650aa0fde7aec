"""Rule-based rewards for R1-style RL, composable by a spec string: ``"accuracy:1,format:0.2,language:0.1"``.

Notable:
- accuracy: the task's own strict verifier on the text after the last ``</think>`` (exact, numeric with
  tolerance, math-verify for LaTeX/\\boxed, countdown expressions, code run in the sandbox). When the gold
  answer cannot be parsed the sample is *skipped* (``result.skipped``), never rewarded.
- format (R1's template): the completion starts inside the think block (the generation prompt opened
  ``<think>``), so it may or may not repeat ``<think>`` once at the very start; exactly one ``</think>``,
  non-empty thinking, a non-empty answer after it, and no stray ``<think>``, chat or end-of-sentence tags.
  Binary: a loose regex that accepts repeated closing tags gets hacked (open-r1).
- language (R1 §2.3.2): the share of the chain of thought's letters written in the prompt's script:
  Latin for en, kana + kanji for ja, Han for zh; any other script's letters count against it. The chain
  of thought is all before the last ``</think>`` (the answer accuracy reads is after it), its tags left
  out. Digits and symbols do not count; a CoT with no letters at all scores 0.
- code: the share of tests the answer's code passes in the sandbox (partial credit; accuracy on a code
  problem is the binary all-pass version).
- conclusion: 1 where the reasoning's last line concludes the answer given (`Task.conclusion_agrees`:
  comparison and largest read "So 84 is larger."), 0 where it concludes otherwise ("So 85 is smaller."
  before 85 as the largest, which accuracy rewards), and not applicable where the task reads no
  conclusion. Like R1's language reward (§2.3.2), it rewards a readable chain of thought, not the answer.
- your own: a part named by its import reference, ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` as uvicorn
  names apps (``"accuracy:1,mypkg.rewards:brevity:0.1"``): a function's name is never a number, so the
  colon before a weight is told from the reference's own. ``fn(completion, answer, problem)`` returns a
  finite float, or None where the part does not apply (see ``custom_part``).
- math-verify times out with SIGALRM, which fails outside the main thread: ``check_math`` runs it with
  its timeout disabled there (input capped at 2,000 characters, but ``10000000!`` alone runs for
  minutes), so ``RewardFn.batch`` scores math-verify problems on the calling thread, with their
  timeouts, while worker threads overlap the rest (sandbox subprocesses).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from nanoseek.data.tasks import (
    EOS_TEXT,
    THINK_END,
    THINK_START,
    Problem,
    Task,
    check_code,
    extract_answer,
    get_task,
    prescore,
    script_counts,
)
from nanoseek.data.tasks.answers import split_completion, strip_eos
from nanoseek.tokenizer import ASSISTANT, BOS, USER

_CHAT_TAGS = (USER, ASSISTANT, BOS)
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# Pieces of a completion (`split_completion`, shared with the tasks, lives with the answer extraction)
# ----------------------------------------------------------------------------------------------------


def format_reward(completion: str, prompt_opened_think: bool = True) -> float:
    """1.0 iff ``[<think>] thinking </think> answer`` with exactly one of each tag and both parts non-empty."""
    text = strip_eos(completion)
    if EOS_TEXT in text or any(tag in text for tag in _CHAT_TAGS):
        return 0.0
    body = text.lstrip()
    if body.startswith(THINK_START):
        body = body[len(THINK_START) :]
    elif not prompt_opened_think:
        return 0.0
    if THINK_START in body or body.count(THINK_END) != 1:
        return 0.0
    thinking, answer = body.split(THINK_END)
    # thinking made only of punctuation ("...") is empty thinking
    return float(any(ch.isalnum() for ch in thinking) and bool(answer.strip()))


def language_consistency(text: str, language: str) -> float:
    """Share of ``text``'s letters written in ``language``'s script (en / ja / zh)."""
    c = script_counts(text)
    total = sum(c.values())  # letters of other scripts (Cyrillic, Hangul, ...) count against every language
    if total == 0:
        return 0.0
    if language == "en":
        return c["latin"] / total
    if language == "ja":
        return (c["kana"] + c["han"]) / total
    if language == "zh":
        return c["han"] / total
    raise ValueError(f"language consistency knows en, ja, zh; got {language!r}")


# ----------------------------------------------------------------------------------------------------
# Reward components: fn(problem, completion, ctx) -> float, or None (accuracy: skip; others: n/a)
# ----------------------------------------------------------------------------------------------------


@dataclass
class RewardContext:
    task: Task | None
    prompt_opened_think: bool

    def task_for(self, problem: Problem) -> Task:
        return self.task if self.task is not None else get_task(problem.task, reread=False)


def _accuracy(problem: Problem, completion: str, ctx: RewardContext) -> float | None:
    # with the think block opened by the prompt, an answer exists only after </think>
    return ctx.task_for(problem).verify(problem, completion, require_think=ctx.prompt_opened_think)


def _format(problem: Problem, completion: str, ctx: RewardContext) -> float | None:
    return format_reward(completion, ctx.prompt_opened_think)


def _language(problem: Problem, completion: str, ctx: RewardContext) -> float | None:
    thinking, _ = split_completion(completion, ctx.prompt_opened_think)
    # the tags' letters (an early </think>, a stray <think>, a new turn's <｜User｜>) are markup, not
    # English words: a Chinese chain of thought that repeated </think> scored 0.6
    for tag in (THINK_START, THINK_END, EOS_TEXT, *_CHAT_TAGS):
        thinking = thinking.replace(tag, " ")
    return language_consistency(thinking, problem.language)


def _code(problem: Problem, completion: str, ctx: RewardContext) -> float | None:
    tests = problem.meta.get("tests")
    if not tests:
        return None
    return check_code(tests, extract_answer(completion, ctx.prompt_opened_think), partial=True)


def _conclusion(problem: Problem, completion: str, ctx: RewardContext) -> float | None:
    reads = getattr(ctx.task_for(problem), "conclusion_agrees", None)  # a duck-typed task may lack it
    agrees = reads(problem, completion) if reads else None
    return None if agrees is None else float(agrees)


RewardComponent = Callable[[Problem, str, RewardContext], "float | None"]
REWARDS: dict[str, RewardComponent] = {
    "accuracy": _accuracy,
    "format": _format,
    "language": _language,
    "code": _code,
    "conclusion": _conclusion,
}
CUSTOM_HELP = "or your own function as MODULE:FUNCTION or FILE.py:FUNCTION"


# ----------------------------------------------------------------------------------------------------
# Your own parts: a function named by its import reference
# ----------------------------------------------------------------------------------------------------

_FILES: dict[Path, ModuleType] = {}  # a reward file runs once per process, however often it is named


def _split_part(part: str) -> tuple[str, str]:
    """A spec part's (name, weight text). A built-in name comes first; else ``X:NAME`` with NAME a
    (dotted) Python name is a reference: a weight is a number, never a name, so ``speed:2`` stays an
    unknown reward weighted 2 and ``mod:fn:2`` is ``mod:fn`` weighted 2."""
    # a Windows path's drive (`C:\rewards\mine.py:fn`, `D:/r.py:fn`) is the file's, not a reward named C
    drive = part[:2] if len(part) > 2 and part[0].isalpha() and part[1] == ":" and part[2] in "\\/" else ""
    head, _, rest = part[len(drive) :].partition(":")
    head = drive + head
    function, _, weight = rest.partition(":")
    if head.strip() not in REWARDS and all(s.isidentifier() for s in function.strip().split(".")):
        return f"{head.strip()}:{function.strip()}", weight
    return head.strip(), rest


def _load_module(where: str) -> ModuleType:
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(os.path.expanduser(where)).resolve()
        if path not in _FILES:
            if not path.is_file():
                raise ImportError(f"no file {path}")
            spec = importlib.util.spec_from_file_location(f"_nanoseek_reward_{len(_FILES)}_{path.stem}", path)
            # no loader for a file not named .py (`./rewards/mine:fn`): an AttributeError on None was all
            # that said so
            if spec is None or spec.loader is None:
                raise ImportError(f"{path} is not a Python file (FILE.py)")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # a dataclass in the file looks its module up there
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[spec.name]
                raise
            _FILES[path] = module
        return _FILES[path]
    if not where or where.startswith("."):  # import_module: a TypeError for ".mod" (no package to resolve it)
        raise ImportError("a module's absolute import path is needed (MODULE:FUNCTION), or a FILE.py")
    # the working directory, as uvicorn's --app-dir: the `nanoseek` script's sys.path does not hold it
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(where)


def load_reward_function(reference: str) -> Callable[..., Any]:
    """The function ``MODULE:FUNCTION`` (a dotted import path) or ``FILE.py:FUNCTION`` (a path, relative
    to the working directory) names; ValueError saying which, when it cannot be imported or called."""
    where, _, name = reference.rpartition(":")
    try:
        obj: Any = _load_module(where)
    except ImportError as e:
        raise ValueError(f"reward {reference!r}: cannot import {where!r}: {e}") from e
    for attr in name.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward {reference!r}: {where!r} has no {name!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward {reference!r} is not a function (a {type(obj).__name__} object)")
    return obj


def custom_part(reference: str) -> RewardComponent:
    """The reward component of the user's function ``reference`` names.

    It is called as ``fn(completion, answer, problem)``: the completion's text as the model wrote it (up to
    its stop token; the prompt opened the think block), the answer accuracy reads (the text after the last
    ``</think>``, stripped; None when the think block never closed; the whole completion where the chat
    template opens no think block), and the ``Problem`` (``.prompt``, ``.answer`` the gold answer,
    ``.task`` its task spec, ``.language``, ``.meta``). It returns a finite number, or None where the part
    does not apply (left out of the total and of the part's mean, as ``code`` on a non-code problem).
    With ``--reward-workers`` above 1 it runs on several threads at once.
    """
    fn = load_reward_function(reference)

    def part(problem: Problem, completion: str, ctx: RewardContext) -> float | None:
        value = fn(completion, extract_answer(completion, ctx.prompt_opened_think), problem)
        if value is None:
            return None
        try:  # a number, or a 0-d array of one; "0.5" is a bug in the function, not a reward
            number = math.nan if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):  # NaN or inf would take its whole group's signal (group_advantages)
            raise ValueError(
                f"reward {reference!r} returned {value!r} for problem {problem.id!r}: return a finite "
                "number, or None where it does not apply"
            )
        return number

    return part


def reward_part(name: str) -> RewardComponent:
    """The component a spec's part names: a built-in (``REWARDS``) or ``custom_part``'s reference."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        return custom_part(name)
    raise ValueError(f"unknown reward {name!r}; available: {', '.join(REWARDS)}, {CUSTOM_HELP}")


class RewardResult(tuple):
    """``(total, parts)`` that also carries ``skipped``: True when the gold answer could not be parsed.

    Unpacks as a pair (``total, parts = reward(p, c)``). A skipped sample has total 0.0 and must be
    left out of advantages and accuracy means.
    """

    skipped: bool

    def __new__(cls, total: float, parts: dict[str, float], skipped: bool = False) -> RewardResult:
        obj = super().__new__(cls, (total, parts))
        obj.skipped = skipped
        return obj

    @property
    def total(self) -> float:
        return self[0]

    @property
    def parts(self) -> dict[str, float]:
        return self[1]


class RewardFn:
    """A weighted sum of reward components; call it as ``reward(problem, completion_text)``."""

    def __init__(
        self, weights: dict[str, float], task: Task | None = None, prompt_opened_think: bool = True
    ) -> None:
        if not weights:
            raise ValueError(f"no reward parts; available: {', '.join(REWARDS)}, {CUSTOM_HELP}")
        self.weights = dict(weights)
        self.parts = {name: reward_part(name) for name in self.weights}
        self.ctx = RewardContext(task, prompt_opened_think)

    def __call__(self, problem: Problem, completion: str) -> RewardResult:
        parts: dict[str, float] = {}
        for name, part in self.parts.items():
            value = part(problem, completion, self.ctx)
            if value is None:
                if name == "accuracy":  # unparseable gold: never reward this sample
                    return RewardResult(0.0, {}, skipped=True)
                continue  # not applicable (e.g. code reward on a non-code problem)
            parts[name] = float(value)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return RewardResult(total, parts)

    def batch(
        self, problems: Sequence[Problem], completions: Sequence[str], workers: int = 1
    ) -> list[RewardResult]:
        """``[self(p, c) ...]`` in order, through ``score_pairs`` (threads, math-verify on this one)."""
        return score_pairs(self, problems, completions, workers)

    def __repr__(self) -> str:
        return f"RewardFn({','.join(f'{k}:{v:g}' for k, v in self.weights.items())})"


def score_pairs(
    score: Callable[[Problem, str], T],
    problems: Sequence[Problem],
    completions: Sequence[str],
    workers: int = 1,
) -> list[T]:
    """``[score(p, c) for each pair]``, in order. ``workers > 1`` overlaps the pairs on that many threads
    (sandboxed code runs in subprocesses), but math-verify problems stay on this thread: their timeouts
    only work there. A pair repeated (a group's identical completions) is scored once, as serially."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    first: dict[tuple[int, str], int] = {}  # (problem, completion) -> the index that scores it
    owner = [
        first.setdefault((id(p), c), i) for i, (p, c) in enumerate(zip(problems, completions, strict=True))
    ]
    todo = [i for i, o in enumerate(owner) if o == i]
    prescore([problems[i] for i in todo], [completions[i] for i in todo])  # reasoning-gym: one child
    done: dict[int, T] = {}
    if workers <= 1:
        done = {i: score(problems[i], completions[i]) for i in todo}
    else:
        here = {i for i in todo if problems[i].meta.get("verifier") == "math"}
        pool = ThreadPoolExecutor(workers)
        try:
            futures = {i: pool.submit(score, problems[i], completions[i]) for i in todo if i not in here}
            done = {i: score(problems[i], completions[i]) for i in sorted(here)}
            # a bounded wait: the kernel may deliver Ctrl-C's SIGINT to a worker thread, and then
            # nothing interrupts an unbounded one before every pair is scored (a sandbox timeout each)
            while wait(futures.values(), timeout=0.2).not_done:
                pass
        except BaseException:
            # Ctrl-C or an error stops here: the pairs not started are dropped, not scored first, and
            # those running are not waited for (each ends within its sandbox timeout, its child killed)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        done.update((i, f.result()) for i, f in futures.items())
    return [done[o] for o in owner]


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"accuracy:1,format:0.2"`` -> {"accuracy": 1.0, "format": 0.2}; a bare name has weight 1.
    A custom part (``"mypkg.rewards:brevity:0.1"``) is imported now, so a bad one is said before training."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, w = _split_part(part)
        try:
            reward_part(name)
        except ValueError as e:
            raise ValueError(f"{e} (in the reward spec {spec!r})") from e
        if name in weights:
            raise ValueError(f"reward {name!r} appears twice in {spec!r}")
        try:
            # a bare name weighs 1; "format:" lost its number, which is not the same
            weight = float(w) if w.strip() else math.nan if part.endswith(":") else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):  # NaN or inf would make every total (and GRPO's advantages) NaN
            raise ValueError(f"bad weight {w!r} for reward {name!r} in {spec!r}: give a finite number")
        weights[name] = weight
    if not weights:
        raise ValueError(f"empty reward spec {spec!r}")
    return weights


def build_reward(
    spec: str = "accuracy:1,format:0.2", task: Task | str | None = None, prompt_opened_think: bool = True
) -> RewardFn:
    """The RewardFn for ``spec``; ``task`` defaults to ``get_task(problem.task)`` per problem."""
    if isinstance(task, str):
        task = get_task(task)
    return RewardFn(parse_reward_spec(spec), task, prompt_opened_think)
