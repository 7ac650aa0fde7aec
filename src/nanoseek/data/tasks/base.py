"""What every task is: a `Problem`, the hash split that keeps train and test apart, the `Task` interface,
and the spec strings that name a task with its options (`arithmetic?ops=add&wording=unseen`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

LANGUAGES: tuple[str, ...] = ("en", "ja", "zh")
SPLITS: tuple[str, ...] = ("train", "test")
HELDOUT_EVERY = 5  # 1 in 5 canonical problems is held out
VERIFIERS: tuple[str, ...] = ("exact", "numeric", "math", "code")


def _parse_value(v: str) -> Any:
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def parse_task_spec(spec: str, raw: bool = False) -> tuple[str, dict[str, Any]]:
    """``"arithmetic?digits=3&ops=add,sub"`` -> ("arithmetic", {"digits": 3, "ops": "add,sub"}); with
    `raw`, every value as written (``"3"``), for `typed_options` to read as its parameter's type."""
    base, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise ValueError(f"bad task option {part!r} in {spec!r}; expected key=value")
        if k in options:  # the last would win silently: `digits=3&digits=4` drew 4-digit problems
            raise ValueError(f"task option {k!r} is given twice in {spec!r}; give it once")
        options[k] = v if raw else _parse_value(v)
    return base, options


# What an option of each type must be written as, for the error that says so.
_MUST_BE = {bool: "true or false (or 1 / 0)", int: "a whole number", float: "a number"}


def _typed_value(value: str, hint: Any) -> Any:
    """An option's text as the type its parameter is annotated with (`hint`); ValueError naming what
    it must be where it is not. A parameter that takes text gets the text as written ("007" stays
    "007"); one without a type we know gets `_parse_value`'s guess, as before types were read."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(hint) if union else (hint,)) - {type(None)}
    if str in kinds:
        return value
    if bool in kinds:
        if value.lower() in ("true", "1", "false", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(_MUST_BE[bool])
    if int in kinds:
        if re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ValueError(_MUST_BE[int])
    if float in kinds:
        try:
            return float(value)
        except ValueError:
            raise ValueError(_MUST_BE[float]) from None
    return _parse_value(value)


def typed_options(
    factory: Callable[..., Any], task: str, raw: dict[str, str], given: Sequence[str] = ("spec",)
) -> dict[str, Any]:
    """A task's options (`parse_task_spec(spec, raw=True)`) as the types `factory`'s parameters name,
    checked once here for every family: a value that is not of its type ("digits=abc") and an option
    the factory does not take are refused by name, not met later as a TypeError in the middle of a
    comparison. `given` are the parameters the registry fills itself."""
    try:
        params = inspect.signature(factory).parameters
        # the class's own __init__ (mypy refuses __init__ read off any object, a class included)
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)  # type: ignore[misc]
    except Exception:  # a registered factory we cannot introspect: its options as they were parsed
        return {k: _parse_value(v) for k, v in raw.items()}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [n for n, p in params.items() if p.kind in keyword and n not in given]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in named and not takes_any:
            takes = ", ".join(named) or "none"
            raise ValueError(f"bad options for task {task!r}: no option {key!r} (it takes: {takes})")
        try:
            out[key] = _typed_value(value, hints.get(key, Any) if key in named else Any)
        except ValueError as e:
            raise ValueError(f"bad options for task {task!r}: {key}={value!r} must be {e}") from None
    return out


def with_option(spec: str, option: str, value: Any) -> str:
    """`spec` with `option` set to `value`, whatever it said before."""
    spec = spec_without(spec, option)
    return f"{spec}{'&' if '?' in spec else '?'}{option}={value}"


def in_unseen_wordings(spec: str) -> str:
    """The spec of the same held-out problems phrased as training never phrased them (built-in
    families: `BuiltinTask.UNSEEN_WORDINGS`), whatever wording `spec` named."""
    return with_option(spec, "wording", "unseen")


def is_unseen_wordings(spec: str) -> bool:
    return parse_task_spec(spec)[1].get("wording") == "unseen"


def refuse_unseen_wordings(names: Sequence[str], what: str = "--task") -> None:
    """Refuse to train on tasks asked in their held-out wordings (`?wording=unseen`): evaluated in them,
    a model that reads the problem keeps its score and one that memorized the sentence does not, which
    tells nothing once a stage trained on them (the speedrun's report gave that figure as the phrasings
    no stage trains on)."""
    trained = [name for name in names if is_unseen_wordings(name)]
    if trained:
        raise ValueError(
            f"{what} {', '.join(map(repr, trained))}: wording=unseen is held out from training, for "
            "evaluation only; train in the default (varied) or first wording"
        )


def check_training_tasks(names: Sequence[str], what: str = "--task") -> None:
    """A training stage's task list: none named twice (its problems were drawn twice, grpo's pool there
    twice and distill's traces kept up to twice per prompt), none in the held-out wordings."""
    repeated = sorted({t for t in names if list(names).count(t) > 1})
    if repeated:
        raise ValueError(f"{what} names {', '.join(repeated)} more than once")
    refuse_unseen_wordings(names, what)


def as_second_turn(spec: str) -> str:
    """The spec of the same held-out problems, each asked second in a chat (`ChatTurnTask`)."""
    return with_option(spec, "turn", 2)


def is_later_turn(spec: str) -> bool:
    return parse_task_spec(spec)[1].get("turn", 1) != 1


def spec_without(spec: str, option: str) -> str:
    """The spec with `option` dropped, its text otherwise as written (`sorting?count=5&wording=unseen`
    -> `sorting?count=5`)."""
    base, _, query = spec.partition("?")
    rest = "&".join(o for o in query.split("&") if o and o.partition("=")[0] != option)
    return f"{base}?{rest}" if rest else base


@dataclass
class Problem:
    id: str
    prompt: str
    answer: str
    language: str
    task: str  # the task spec: get_task(problem.task) rebuilds the task that scores it
    meta: dict[str, Any] = field(default_factory=dict)
    # earlier turns of the chat that asks it (`task?turn=N`), as a chat client sends them back
    history: tuple[dict[str, str], ...] = ()

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat that asks this problem: its earlier turns, then its prompt."""
        return [*self.history, {"role": "user", "content": self.prompt}]


def worked_solution_of(task: Any, problem: Problem) -> str | None:
    """The task's worked solution of `problem`, or None where it has none to imitate: a task that
    writes none (reasoning-gym), a JSONL line without "reasoning"."""
    if not hasattr(task, "worked_solution"):
        return None
    try:
        return task.worked_solution(problem)
    except NotImplementedError:
        return None


def split_of(key: str) -> str:
    """The split a canonical problem key belongs to (fixed forever: a hash, not a seed)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return "test" if h % HELDOUT_EVERY == 0 else "train"


def _problem_id(task: str, key: str) -> str:
    return f"{task}/{hashlib.blake2b(key.encode('utf-8'), digest_size=6).hexdigest()}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_language(language: str | None, allowed: Sequence[str]) -> None:
    if language is not None and language not in allowed:
        raise ValueError(f"unsupported language {language!r}; this task has {tuple(allowed)}")


class Task:
    """A source of verifiable problems with disjoint train/test splits."""

    name: str = ""
    languages: tuple[str, ...] = LANGUAGES
    # `problems(language=None)` gives each language an equal share: a held-out score over a random
    # language mix moves with the mix (a family solved in one language and not another swung 20 points
    # between two draws of 48). Tasks whose files hold uneven languages keep the file's mix.
    balance_languages: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def changed_on_disk(self) -> bool:
        """Whether the files this task was read from changed since (`get_task` then reads them again)."""
        return False

    def iter_problems(
        self, split: str, seed: int = 0, language: str | Sequence[str] | None = None
    ) -> Iterator[Problem]:
        """Endless stream of problems of ``split`` (may repeat; ``problems`` de-duplicates)."""
        raise NotImplementedError

    def problems(
        self, split: str, n: int, seed: int = 0, language: str | None = None, strict: bool = True
    ) -> list[Problem]:
        """``n`` distinct problems of ``split``, reproducible from ``seed``; with ``strict=False``, as
        many as the split holds when that is fewer (a training pool), instead of an error. Without a
        ``language``, a task with ``balance_languages`` gives each of its languages n/L of them."""
        _check_split(split)
        _check_language(language, self.languages)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[Problem] = []
        if n == 0:  # (the draw below counts after it takes one: it gave one, or with quotas of 0, ran dry)
            return out
        seen: set[str] = set()
        quota = None
        if language is None and self.balance_languages and len(self.languages) > 1:
            per, extra = divmod(n, len(self.languages))
            quota = {lang: per + (i < extra) for i, lang in enumerate(self.languages)}
        misses = 0  # draws in a row that found nothing new
        for p in self.iter_problems(split, seed, language):
            if p.id in seen or (quota is not None and quota.get(p.language, 0) <= 0):
                misses += 1
                # a small problem space (or split) runs dry: say so instead of spinning forever
                if misses > 1000 + 20 * len(out):
                    if not strict:
                        return out
                    raise ValueError(
                        f"task {self.name!r} has only {len(out)} distinct {split} problems at this size; "
                        f"asked for {n} (raise the difficulty / size)"
                    )
                continue
            seen.add(p.id)
            out.append(p)
            if quota is not None:
                quota[p.language] -= 1
            misses = 0
            if len(out) >= n:
                break
        return out

    def verify(self, problem: Problem, completion: str, require_think: bool = False) -> float | None:
        """Correctness in [0, 1], or None if the gold answer cannot be parsed (skip the sample)."""
        raise NotImplementedError

    def score(self, problem: Problem, completion: str, require_think: bool = False) -> float:
        """Correctness in [0, 1] (0 for a sample whose gold is unparseable; use ``verify`` to tell)."""
        s = self.verify(problem, completion, require_think)
        return 0.0 if s is None else s

    def conclusion_agrees(self, problem: Problem, completion: str) -> bool | None:
        """Whether the reasoning's last line concludes what the answer says, where the task can read
        it (None: it cannot). The verifier reads only the answer after </think>: a trace that
        concludes "So 85 is smaller." and answers 85 as the largest passes it."""
        return None

    # worked_solution(problem) -> str exists only on tasks that can write one (built-ins, JSONL lines
    # with "reasoning"), so `hasattr(task, "worked_solution")` tells callers whether SFT data can be built.


class ChatTurnTask(Task):
    """`<task>?turn=N`: each problem of the task asked as the N-th question of a chat, after N - 1 other
    problems of it (training split, the same language) with their answers, as a chat client sends the
    history back (R1's template keeps only the answers of earlier turns). The problems and their ids
    are the task's own, so each pairs with itself asked alone; scored as the task scores it. A model
    taught only one-question chats answers from the first question of a chat, not the last: what a
    user of `nanoseek chat` meets at the second question."""

    def __init__(self, spec: str, inner: Task, turn: Any) -> None:
        if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
            raise ValueError(f"turn must be a whole number >= 1, got {turn!r} in {spec!r}")
        self.name, self.inner, self.turn = spec, inner, turn
        self.languages = inner.languages
        self.balance_languages = inner.balance_languages

    def changed_on_disk(self) -> bool:
        return self.inner.changed_on_disk()

    def __getattr__(self, name: str) -> Any:
        if name in ("family", "kind"):  # what reports and verifiers read; no worked solutions: SFT
            return getattr(self.inner, name)  # data never holds a history it would lose
        raise AttributeError(name)

    def iter_problems(
        self, split: str, seed: int = 0, language: str | Sequence[str] | None = None
    ) -> Iterator[Problem]:
        earlier: dict[str, Iterator[Problem]] = {}
        for p in self.inner.iter_problems(split, seed, language):
            before = earlier.setdefault(p.language, self.inner.iter_problems("train", seed + 1, p.language))
            history: list[dict[str, str]] = []
            for _ in range(self.turn - 1):
                q = next(before)
                misses = 0
                while q.id == p.id:  # another problem: never the one asked, with its answer (train split)
                    misses += 1
                    if misses > 1000:  # a split of one problem (a small JSONL file): say so, not spin
                        raise ValueError(
                            f"{self.name}: the training split holds no problem in {p.language!r} but the one "
                            "asked, to put before it in the chat"
                        )
                    q = next(before)
                history += [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.answer}]
            yield dataclasses.replace(p, task=self.name, history=tuple(history))

    def verify(self, problem: Problem, completion: str, require_think: bool = False) -> float | None:
        return self.inner.verify(problem, completion, require_think)

    def conclusion_agrees(self, problem: Problem, completion: str) -> bool | None:
        return self.inner.conclusion_agrees(problem, completion)
