"""The embedded pretraining corpus: an endless, seeded stream of worked problems in English, Japanese, Chinese.

Notable:
- Built from the *train* split of the task families in ``nanoseek.data.tasks`` (the split is a hash of
  the canonical problem), so a model pretrained on it can be tested on held-out problems of the same
  families that it has never seen.
- By default every document is a problem and its worked solution in DeepSeek-R1's chat template
  (``<｜User｜>…<｜Assistant｜><think>\\n…\\n</think>\\n answer<｜end▁of▁sentence｜>``), so a tiny
  model answers chat-formatted prompts with ``<think>`` after pretraining alone. Other shapes (plain,
  worksheets, a method explained, textbook form, copy drills) can be mixed in with ``shapes``.
- Default difficulty (what a tiny model can learn); ``harder_fraction`` adds problems one level up.
- Reproducible from the seed alone and fast (pure Python string building, tens of thousands of docs/s).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Mapping, Sequence

from nanoseek.data.tasks import (
    BUILTIN_TASKS,
    LANGUAGES,
    BuiltinTask,
    Problem,
    get_task,
    refuse_unseen_wordings,
)
from nanoseek.data.tasks.base import with_option
from nanoseek.tokenizer import ASSISTANT, EOS, THINK_END, USER, render_chat

# Document shapes: "chat" (an R1 chat turn), "series" (a worksheet of problems), "explained" (the
# method, then a worked problem), "textbook" (Question / Solution / Answer), "plain" (problem and
# worked solution), "copy" (a random sequence of numbers or letters written out again: the setting in
# which induction heads form fastest, Olsson et al. 2022).
SHAPE_NAMES: tuple[str, ...] = ("chat", "series", "explained", "textbook", "plain", "copy")
# The default is chat turns only: in controlled runs (benchmarks/bench_learning.py) the held-out loss
# on the skill-bearing tokens fell faster with them than with the mixed shapes, at equal tokens and
# seconds; the other shapes teach the same skills in wrappers that are never asked for.
SHAPES: dict[str, float] = {"chat": 1.0}
MIXED_SHAPES: dict[str, float] = {
    "chat": 0.35,
    "series": 0.15,
    "explained": 0.10,
    "textbook": 0.10,
    "plain": 0.30,
}
# Problems one difficulty level up: none by default (the same runs learned the default level faster
# without them); raise it for breadth.
HARDER_FRACTION = 0.0
# A chat of several questions (`multi_turn`) grows by one more question only while it stays within
# this many characters, so that it fits one 320-token training window whole.
CHAT_CHARS = 450
# In such a chat, each further question is of the first one's family with this probability, else of
# any family. A follow-up of the same kind is the hard case for a small model: the earlier question
# holds numbers (or letters) of the same form as the last, and it must copy from the last. With the
# families drawn independently (about 1 in 6 alike), three runs' final models asked second / fourth in
# a chat of one family answered 70.1 / 48.2% on average; at 1/2, 77.5 / 61.0%, and 92.3% alone
# against 88.5% (benchmarks/README.md, "Follow-ups of one kind")
SAME_FAMILY = 0.5
_COPY_HEADER = {"en": "Copy:", "ja": "写す:", "zh": "抄写:"}
_COPY_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

EXPLANATIONS: dict[str, dict[str, str]] = {
    "arithmetic": {
        "en": "To add or subtract, work column by column from the ones place, carrying or borrowing 1 when needed. To multiply, split a number into tens and ones and add the parts.",
        "ja": "足し算と引き算は一の位から順に計算し、必要なら繰り上がりや繰り下がりをする。掛け算は数を十の位と一の位に分けて、部分ごとの積を足す。",
        "zh": "加法和减法从个位开始逐位计算，需要时进位或借位。乘法把一个数拆成十位和个位，再把各部分的积相加。",
    },
    "countdown": {
        "en": "In the numbers game you combine the given numbers with + - * / to reach the target. Each number is used exactly once, one step at a time.",
        "ja": "数のゲームでは、与えられた数を + - * / で組み合わせて目標の数を作る。どの数もちょうど1回ずつ使う。",
        "zh": "数字游戏里，用 + - * / 组合给定的数得到目标数。每个数恰好用一次，一步一步地算。",
    },
    "linear_equation": {
        "en": "To solve an equation, do the same thing to both sides. First move the constant, then divide by the coefficient of x: go up its times table until the product is the constant.",
        "ja": "方程式を解くには、両辺に同じ操作をする。まず定数を移し、次に x の係数で割る。係数の九九を順に進め、積が定数になったところが答え。",
        "zh": "解方程时，两边做同样的运算。先移走常数，再除以 x 的系数：顺着系数的乘法表往上数，直到积等于常数。",
    },
    "sorting": {
        "en": "To sort numbers from smallest to largest, repeatedly take the smallest number that is left and cross it out with _.",
        "ja": "数を小さい順に並べるには、残っている中で一番小さい数を順に取り出し、_ で消す。",
        "zh": "要把数从小到大排序，就反复取出剩下的数中最小的一个，并用 _ 划掉。",
    },
    "comparison": {
        "en": "To compare two numbers, a number with more digits is larger; with the same number of digits, compare from the highest place down.",
        "ja": "二つの数を比べるとき、桁数が多い方が大きい。桁数が同じなら、上の位から順に比べる。",
        "zh": "比较两个数时，位数多的数更大；位数相同时，从最高位开始依次比较。",
    },
    "largest": {
        "en": "To find the largest of several numbers, compare two of them, then compare the larger with the next.",
        "ja": "いくつかの数の中で一番大きい数を見つけるには、二つを比べ、大きい方を次の数と比べる。",
        "zh": "要找出几个数中最大的数，先比较两个数，再把较大的与下一个数比较。",
    },
    "counting": {
        "en": "To count a letter, read the text one letter at a time and add one each time the letter appears.",
        "ja": "文字を数えるには、一文字ずつ読み、その文字が出るたびに1を足す。",
        "zh": "数一个字母时，逐个读字母，每出现一次就加一。",
    },
    "modular": {
        "en": "The remainder is what is left after taking away the largest multiple of the divisor that fits.",
        "ja": "余りとは、割る数の倍数のうち入る最大のものを引いた残りである。",
        "zh": "余数就是减去不超过被除数的最大倍数之后剩下的数。",
    },
    "word_problem": {
        "en": "In a word problem, first decide the operation: getting more means adding, giving away means subtracting, equal groups mean multiplying.",
        "ja": "文章題では、まず計算の種類を決める。もらうなら足し算、あげるなら引き算、同じ数ずつなら掛け算。",
        "zh": "应用题先确定运算：得到更多用加法，送出用减法，每份一样多用乘法。",
    },
}
_TEXTBOOK = {
    "en": ("Question", "Solution", "Answer"),
    "ja": ("問題", "解き方", "答え"),
    "zh": ("问题", "解法", "答案"),
}
_SERIES_HEADER = {"en": "Practice problems.", "ja": "練習問題。", "zh": "练习题。"}


def chat_document(problem: Problem, worked: str, history: Sequence[tuple[Problem, str]] = ()) -> str:
    """An R1 chat: the text after BOS that the tokenizer's template yields for this exchange, after the
    (problem, worked solution) turns of `history`, which the template renders as a chat client sends
    them back: each answer without its reasoning."""
    past: list[dict[str, str]] = []
    for q, w in history:
        # the answer alone, as a client sends it back (the server's `content`, `task?turn=N`'s history):
        # the template keeps what follows </think>, which in a worked solution starts with a newline
        answer = w.split(THINK_END)[-1].strip()
        past += [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": answer}]
    earlier = render_chat(past, bos_token="", add_generation_prompt=False) if past else ""
    return f"{earlier}{USER}{problem.prompt}{ASSISTANT}{worked}{EOS}"


def plain_document(problem: Problem, worked: str) -> str:
    return f"{problem.prompt}\n{worked}"


def textbook_document(task: BuiltinTask, problem: Problem) -> str:
    q, s, a = _TEXTBOOK[problem.language]
    return f"{q}: {problem.prompt}\n{s}:\n{task.steps(problem.meta, problem.language)}\n{a}: {problem.answer}"


def copy_document(rng: random.Random, language: str) -> str:
    """A random sequence of 2-digit numbers or letter groups, then the same sequence again."""
    if rng.random() < 0.5:
        items = [str(rng.randint(10, 99)) for _ in range(rng.randint(4, 12))]
    else:
        items = [
            "".join(rng.choices(_COPY_ALPHABET[10:], k=rng.randint(1, 4))) for _ in range(rng.randint(4, 10))
        ]
    seq = ", ".join(items)
    return f"{_COPY_HEADER[language]} {seq}\n{seq}"


def iter_documents(
    seed: int = 0,
    split: str = "train",
    languages: Sequence[str] = LANGUAGES,
    tasks: Sequence[str] | None = None,
    shapes: Mapping[str, float] | None = None,
    harder_fraction: float = HARDER_FRACTION,
    blank_spelled: bool = False,
    multi_turn: float = 0.0,
    same_family: float = SAME_FAMILY,
) -> Iterator[str]:
    """Endless reproducible stream of documents built from ``split`` problems of the built-in families.

    ``split="train"`` is what pretraining uses; ``"test"`` exists only to measure a language-model loss
    on held-out problems and must never be trained on. ``shapes`` weighs the document shapes (from
    ``SHAPE_NAMES``; default ``SHAPES``, chat turns only; ``MIXED_SHAPES`` is the old mix),
    ``harder_fraction`` is the share of problems one level harder. ``blank_spelled`` drops the strings
    a problem spells letter by letter (`BuiltinTask.spelled`: the text of a counting problem) from the
    same stream: the documents to train a tokenizer on, so that it learns no merges from random letters.
    ``multi_turn`` is the share of chat documents that ask two or three questions in a row, in one
    language, the families mixed, as a chat does: a model that only ever saw one question after BOS
    reads the first question of a chat, not the last (run W0's final model: 94.7% alone, 8.3% asked
    second). Their earlier answers come without reasoning, as the template renders a chat's history;
    pretraining's `mask_prompts` leaves them untrained (`in_history_answer`). ``same_family`` is the
    chance that each further question is of the first one's family (else any family's).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    weights = dict(SHAPES if shapes is None else shapes)
    known = sorted(SHAPE_NAMES)
    unknown = sorted(set(weights) - set(known))
    if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"shapes must weigh some of {known} with non-negative weights, got {weights}")
    if not 0.0 <= harder_fraction <= 1.0:
        raise ValueError(f"harder_fraction must be in [0, 1], got {harder_fraction}")
    if not 0.0 <= multi_turn <= 1.0:
        raise ValueError(f"multi_turn must be in [0, 1], got {multi_turn}")
    if not 0.0 <= same_family <= 1.0:
        raise ValueError(f"same_family must be in [0, 1], got {same_family}")
    shape_names = list(weights)
    shape_cum = list(itertools.accumulate(weights[k] for k in shape_names))
    languages = tuple(languages)
    bad = [x for x in languages if x not in LANGUAGES]
    if bad or not languages:
        raise ValueError(f"languages must be a non-empty subset of {LANGUAGES}, got {languages}")
    names = tuple(tasks) if tasks is not None else BUILTIN_TASKS
    if not names:
        raise ValueError("tasks must name at least one built-in task family")
    if split == "train":
        refuse_unseen_wordings(names, "the corpus's tasks")
    families: list[tuple[BuiltinTask, Iterator[Problem], BuiltinTask, Iterator[Problem]]] = []
    for i, name in enumerate(names):
        base = get_task(name)
        if not isinstance(base, BuiltinTask):
            raise ValueError(f"the synthetic corpus is built from built-in tasks, got {name!r}")
        # one level above the spec's own difficulty; built only when asked for (a level up may not
        # exist for options that fit the spec's own level)
        hard = get_task(with_option(name, "difficulty", base.difficulty + 1)) if harder_fraction else base
        assert isinstance(hard, BuiltinTask)  # base's family, built a level up
        families.append(
            (
                base,
                base.iter_problems(split, seed=seed * 1000 + i, language=languages),
                hard,
                hard.iter_problems(split, seed=seed * 1000 + i, language=languages),
            )
        )
    rng = random.Random(f"synthetic|{seed}|{split}")

    def draw(fam: tuple) -> tuple[BuiltinTask, Problem]:
        base, it, hard, hard_it = fam
        return (hard, next(hard_it)) if rng.random() < harder_fraction else (base, next(it))

    def documents() -> Iterator[tuple[str, list[tuple[BuiltinTask, Problem]]]]:
        """Each document with the problems it holds."""
        while True:
            fam = rng.choice(families)
            task, p = draw(fam)
            shape = shape_names[bisect.bisect_right(shape_cum, rng.random() * shape_cum[-1])]
            if shape == "chat":
                held = [(task, p)]
                if multi_turn and rng.random() < multi_turn:  # (no draw at 0: the stream stays as it was)
                    for _ in range(rng.choice((1, 2))):
                        kind = fam if rng.random() < same_family else rng.choice(families)
                        t2, p2 = draw(kind)
                        while p2.language != p.language:
                            t2, p2 = draw(kind)
                        held.append((t2, p2))
                (t, q), history = held[-1], [(q2, t2.worked_solution(q2)) for t2, q2 in held[:-1]]
                doc = chat_document(q, t.worked_solution(q), history)
                while history and len(doc) > CHAT_CHARS:  # the oldest question goes first
                    history, held = history[1:], held[1:]
                    doc = chat_document(q, t.worked_solution(q), history)
                yield doc, held
            elif shape == "copy":
                yield copy_document(rng, p.language), []
            elif shape == "series":
                # several problems of one family in one language, like a worksheet
                held = [(task, p)]
                for _ in range(rng.randint(1, 3)):
                    t2, p2 = draw(fam)
                    while p2.language != p.language:
                        t2, p2 = draw(fam)
                    held.append((t2, p2))
                parts = [plain_document(q, t.worked_solution(q)) for t, q in held]
                yield "\n\n".join([_SERIES_HEADER[p.language], *parts]), held
            elif shape == "explained":
                worked = plain_document(p, task.worked_solution(p))
                yield f"{EXPLANATIONS[task.family][p.language]}\n\n{worked}", [(task, p)]
            elif shape == "textbook":
                yield textbook_document(task, p), [(task, p)]
            else:
                yield plain_document(p, task.worked_solution(p)), [(task, p)]

    for doc, held in documents():
        if blank_spelled:
            for task, p in held:
                for text in task.spelled(p.meta):
                    doc = doc.replace(text, "")
        yield doc
