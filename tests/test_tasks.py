"""Verifiable tasks: splits never overlap, prompts per language, strict scoring, adapters."""

import dataclasses
import itertools
import json
import re
import time
import warnings
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data.rewards import format_reward, language_consistency, script_counts, split_completion
from nanoseek.data.tasks import (
    BUILTIN_TASKS,
    HELDOUT_EVERY,
    ArithmeticTask,
    Problem,
    check_countdown,
    check_exact,
    check_math,
    extract_answer,
    get_task,
    in_unseen_wordings,
    parse_number,
    parse_task_spec,
    split_of,
    split_task_list,
)
from nanoseek.data.tasks.answers import answer_key, parse_int_list, unbox, unwrap_answer
from nanoseek.tasks import check_numeric


def _canonical(task, p: Problem) -> str:
    return task.split_key(p.meta)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_splits_never_overlap_and_are_reproducible(name):
    task = get_task(name)
    train = task.problems("train", 300, seed=0) + task.problems("train", 100, seed=7)
    test = task.problems("test", 150, seed=0) + task.problems("test", 50, seed=7)
    train_keys = {_canonical(task, p) for p in train}
    test_keys = {_canonical(task, p) for p in test}
    assert not train_keys & test_keys
    assert not {p.id for p in train} & {p.id for p in test}
    assert all(split_of(k) == "train" for k in train_keys) and all(split_of(k) == "test" for k in test_keys)
    assert len({p.id for p in task.problems("test", 150, seed=0)}) == 150  # distinct
    again = task.problems("test", 150, seed=0)
    assert [(p.id, p.prompt, p.language) for p in again] == [(p.id, p.prompt, p.language) for p in test[:150]]
    assert [p.id for p in task.problems("train", 20, seed=1)] != [p.id for p in train[:20]]


@pytest.mark.parametrize("n", [48, 50])
def test_problems_give_each_language_an_equal_share(n):
    """A held-out score must not move with the draw's language mix."""
    from collections import Counter

    for name in ("largest", "addition"):
        problems = get_task(name).problems("test", n, seed=1)
        counts = Counter(p.language for p in problems)
        assert len(problems) == n and max(counts.values()) - min(counts.values()) <= 1, counts
        assert len({p.id for p in problems}) == n
    assert {p.language for p in get_task("addition").problems("test", 9, language="ja")} == {"ja"}


def test_heldout_fraction_is_about_one_in_five():
    task = get_task("arithmetic")
    import random

    rng = random.Random(0)
    keys = {f"arithmetic|{task.key(task.generate(rng))}" for _ in range(5000)}
    frac = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert abs(frac - 1 / HELDOUT_EVERY) < 0.03


def test_commutative_problems_share_one_identity():
    task = get_task("arithmetic")
    a = task.make({"op": "add", "a": 47, "b": 38}, "en")
    b = task.make({"op": "add", "a": 38, "b": 47}, "zh")
    assert a.id == b.id and a.meta["split"] == b.meta["split"]
    c = task.make({"op": "sub", "a": 47, "b": 38}, "en")
    assert c.id != a.id


@pytest.mark.parametrize("name", BUILTIN_TASKS)
@pytest.mark.parametrize("lang", ["en", "ja", "zh"])
def test_prompts_in_language_and_worked_solutions_score(name, lang):
    task = get_task(name)
    for p in task.problems("test", 20, seed=2, language=lang):
        assert p.language == lang and p.task == name
        counts = script_counts(p.prompt)
        if lang == "ja":
            assert counts["kana"] > 0
        elif lang == "zh":
            assert counts["han"] > 0 and counts["kana"] == 0
        else:
            assert counts["kana"] == counts["han"] == 0
        worked = task.worked_solution(p)
        assert worked.startswith("<think>\n") and worked.endswith(f"</think>\n{p.answer}")
        # short enough for a tiny model (< ~80 tokens with a 4k BPE); a division walks up to 12 table rows
        assert len(worked) < (420 if name == "linear_equation" else 200)
        completion = worked[len("<think>") :]  # the prompt opened the think block
        assert task.score(p, completion, require_think=True) == 1.0
        assert format_reward(completion) == 1.0
        thinking, _ = split_completion(completion)
        assert language_consistency(thinking, lang) == 1.0
        # the rebuilt task scores the same problem the same way
        assert get_task(p.task).score(p, worked) == 1.0


@pytest.mark.parametrize("name", [n for n in BUILTIN_TASKS if get_task(n).UNSEEN_WORDINGS])
def test_wordings_change_the_prompt_not_the_problem(name):
    modes = {m: get_task(f"{name}?wording={m}") for m in ("varied", "first", "unseen")}
    for lang in ("en", "ja", "zh"):
        ps = {m: t.problems("test", 40, seed=3, language=lang) for m, t in modes.items()}
        # the same problems, answers and verifier in every wording
        assert [p.id for p in ps["varied"]] == [p.id for p in ps["first"]] == [p.id for p in ps["unseen"]]
        assert [p.answer for p in ps["varied"]] == [p.answer for p in ps["unseen"]]
        default = get_task(name).problems("test", 40, 3, lang)  # what a bare family name asks: varied
        assert [(p.id, p.prompt) for p in ps["varied"]] == [(p.id, p.prompt) for p in default]
        task = modes["varied"]
        seen_forms, unseen_forms = task.WORDINGS[lang], task.UNSEEN_WORDINGS[lang]
        for first, varied, unseen in zip(ps["first"], ps["varied"], ps["unseen"], strict=True):
            fields = task.fields(first.meta, lang)
            seen = [f.format(**fields) for f in seen_forms]
            assert first.prompt == seen[0] and varied.prompt in seen
            assert unseen.prompt in [f.format(**fields) for f in unseen_forms] and unseen.prompt not in seen
            assert task.score(unseen, task.worked_solution(unseen)) == 1.0
            counts = script_counts(unseen.prompt)
            assert counts["kana"] > 0 if lang == "ja" else counts["kana"] == 0
            assert (counts["han"] > 0) == (lang == "zh") or lang == "ja"
        if len(seen_forms) > 1:  # training sees several phrasings, not one
            assert len({p.prompt.replace(p.answer, "") for p in ps["varied"]}) > 1
            assert len({p.meta.get("wording", 0) for p in ps["varied"]}) >= 2
    # the unseen-wording spec of a spec that named its wording replaces it, never adds a second
    assert in_unseen_wordings(f"{name}?wording=first") == in_unseen_wordings(name) == f"{name}?wording=unseen"
    with pytest.raises(ValueError, match="wording must be one of"):
        get_task(f"{name}?wording=paraphrased")
    with pytest.raises(ValueError, match="no held-out wordings"):
        get_task("modular?wording=unseen")


@pytest.mark.parametrize("name", ["comparison", "largest"])
def test_a_comparisons_conclusion_is_read_against_its_answer(name):
    """`conclusion_agrees`: the reasoning's last line names the answer, in the question's direction if it
    says one. Every worked solution agrees, in every language; "So 85 is smaller." before 85 as the
    largest (what SR19's GRPO taught) does not, nor a conclusion naming another number, nor a think
    block that never closed. Families that cannot read a conclusion say None."""
    task = get_task(name)
    for lang in ("en", "ja", "zh"):
        for p in task.problems("test", 12, seed=2, language=lang):
            worked = task.worked_solution(p)
            assert task.conclusion_agrees(p, worked) is True
            assert task.conclusion_agrees(p, worked[len("<think>") :]) is True  # the prompt opened it
            assert task.conclusion_agrees(p, worked.split("</think>")[0]) is False  # never closed
            assert get_task(f"{name}?turn=2").conclusion_agrees(p, worked) is True
    p = task.problems("test", 1, seed=0, language="en")[0]
    larger = name == "largest" or p.meta["which"] == "larger"
    other = ("smaller", "小さい", "小") if larger else ("larger", "大きい", "大")
    wrong = next(n for n in range(10, 100) if str(n) != p.answer)
    for text in (
        f"So {p.answer} is {other[0]}.\n</think>\n{p.answer}",
        f"よって {p.answer} の方が{other[1]}。\n</think>\n{p.answer}",
        f"所以 {p.answer} 更{other[2]}。\n</think>\n{p.answer}",
        f"So {wrong} is {'larger' if larger else 'smaller'}.\n</think>\n{p.answer}",
        f"Compare them.\n</think>\n{p.answer}",
        f"</think>\n{p.answer}",
    ):
        assert task.conclusion_agrees(p, text) is False, text
    assert task.conclusion_agrees(p, f"Compare.\n{p.answer}\n</think>\n{p.answer}") is True  # no word said
    unsaid = dataclasses.replace(p, meta={k: v for k, v in p.meta.items() if k != "which"})
    assert name == "largest" or task.conclusion_agrees(unsaid, task.worked_solution(p)) is None
    q = get_task("addition").problems("test", 1, seed=0)[0]
    assert get_task("addition").conclusion_agrees(q, get_task("addition").worked_solution(q)) is None


def test_no_training_stage_takes_the_held_out_wordings():
    """`?wording=unseen` asks in the phrasings held out from training: the corpus, the cold start, GRPO
    and distillation took them as any task, and `speedrun --tasks "addition?wording=unseen"` reported the
    final model "in phrasings no stage trains on" in the very ones every stage trained on."""
    from nanoseek.data.synthetic import iter_documents
    from nanoseek.speedrun import PRESETS
    from nanoseek.train.distill import DistillConfig, distill
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.sft import task_conversations

    unseen = "addition?digits=2&wording=unseen"
    with pytest.raises(ValueError, match="wording=unseen is held out from training"):
        next(iter_documents(tasks=["comparison", unseen]))
    with pytest.raises(ValueError, match="wording=unseen is held out from training"):
        task_conversations(f"comparison,{unseen}", 4)
    with pytest.raises(ValueError, match="wording=unseen is held out from training"):
        GRPOConfig(init="ck", tasks=[unseen, "comparison?turn=2&wording=unseen"]).validate()
    with pytest.raises(ValueError, match="wording=unseen is held out from training"):
        distill(DistillConfig(teacher="nowhere", student="tiny", tasks=[unseen]))
    with pytest.raises(ValueError, match="wording=unseen is held out from training"):
        PRESETS["smoke"].with_tasks([unseen, "comparison"])
    # held-out problems in them are what they are for, and a held-out loss in them
    assert get_task(unseen).problems("test", 3, seed=0)
    assert next(itertools.islice(iter_documents(split="test", tasks=[unseen]), 1))
    assert task_conversations("addition?wording=first", 2)  # the other wordings train


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_wrong_and_stuffed_answers_score_zero(name):
    task = get_task(name)
    for p in task.problems("train", 10, seed=3):
        stuffed = " ".join(str(i) for i in range(200)) + " " + p.answer
        assert task.score(p, f"x</think>\n{stuffed}") == 0.0
        assert task.score(p, f"x</think>\n{p.answer} or 7") == 0.0
        assert task.score(p, "x</think>\n") == 0.0
        # the answer is read after the LAST </think>
        assert task.score(p, f"{p.answer}</think>\n-123456") == 0.0


def test_answer_extraction():
    assert extract_answer("thinking</think>\n42") == "42"
    assert extract_answer("a</think>b</think> 7 <｜end▁of▁sentence｜>") == "7"
    assert extract_answer("42") == "42"
    assert extract_answer("42", require_think=True) is None
    p = get_task("arithmetic").make({"op": "add", "a": 40, "b": 2}, "en")
    assert get_task("arithmetic").score(p, "42") == 1.0  # no think tag, not required
    assert get_task("arithmetic").score(p, "42", require_think=True) == 0.0
    for text, value in [
        ("42", 42),
        ("-3.5", -3.5),
        ("\\boxed{12}", 12),
        ("$7$", 7),
        ("1,234", 1234),
        ("7/2", 3.5),
    ]:
        assert parse_number(text) == value
    for text in ["1 2 42", "42 apples", "", "x", "4 2", "1,2345"]:  # "1,2345": no thousands group
        assert parse_number(text) is None
    assert check_numeric("42", "7/0") == 0.0  # no ZeroDivisionError out of the reward
    assert check_numeric("42", "\\boxed{42") == 0.0  # cut off by the token limit: maybe 420, no answer
    assert check_numeric("3.14159", "3.14") == 0.0  # a non-integer gold is matched closely, not roughly
    assert check_exact("New York", "New   York\n") == 1.0 and check_exact("New York", "NewYork") == 0.0
    assert check_exact(" ", "") is None  # a blank gold is skipped, never matched by a blank answer


def test_a_full_stop_after_dollar_math_is_read():
    # "$42$." (a sentence's full stop after the math) scored 0 while "\\(42\\)." and "$42.$" scored 1
    assert check_numeric("42", "$42$.") == 1.0 and check_numeric("42", "$42$。") == 1.0
    assert check_numeric("42", "$42.$") == 1.0 and check_numeric("42", "$41$.") == 0.0
    assert check_exact("Paris", "$Paris$.") == 1.0
    assert check_countdown("$6*5+3$.", [3, 5, 6], 33)
    task = get_task("sorting")
    p = task.make({"numbers": [42, 7, 19, 88]}, "en")
    assert task.score(p, "t</think>$7, 19, 42, 88$.") == 1.0


def test_exact_answers_in_nfd_and_nfc_are_the_same_answer():
    """A gold answer in NFD (copied from a macOS file name) never matched the same text in NFC, what
    models write: が as か + U+3099, 한 as three jamo. Canonically equivalent text is one text (Unicode
    conformance C6), for the verifier and for cons@k's vote alike."""
    import unicodedata

    from nanoseek.data.tasks.answers import answer_key

    for gold in ("がっこう", "한국어", "Café"):
        nfd = unicodedata.normalize("NFD", gold)
        assert nfd != gold and check_exact(nfd, gold) == 1.0 and check_exact(gold, nfd) == 1.0
        assert answer_key(nfd) == answer_key(gold)
    assert check_exact("がっこう", "かっこう") == 0.0


def test_exact_answers_keep_their_case_and_their_words_not_their_spacing():
    """The exact verifier is strict in what an answer says (a sorting task's "Apple" is not "apple"),
    loose only in its markup and spacing."""
    assert check_exact("Apple banana", "apple banana") == 0.0
    assert check_exact("Apple banana", "  Apple \n banana. ") == 1.0


def test_a_math_answer_over_2000_characters_is_not_parsed(monkeypatch):
    """Off the main thread math-verify runs with no timeout: an answer longer than the cap scores 0
    without being parsed, so no answer can hold a reward worker for minutes."""
    import math_verify

    parsed = []
    real = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", lambda text, **kw: parsed.append(text) or real(text, **kw))
    assert check_math("42", "\\boxed{42}" + " " * 1991) == 0.0  # 2,001 characters
    assert parsed == ["$42$"]  # the gold's only
    assert check_math("42", "\\boxed{42}" + " " * 1990) == 1.0  # 2,000 characters: read


def test_a_long_run_of_dots_is_scored_quickly():
    # the closing-"$."-regex retried from every dot of a degenerate answer: ~5 s for these 24K characters
    dots = ". " * 12_000 + "42"
    t = time.perf_counter()
    assert check_numeric("42", dots) == 0.0 and check_exact("42", dots) == 0.0
    assert not check_countdown(dots, [3, 5, 6], 33)
    assert time.perf_counter() - t < 1.0


def test_countdown_checker():
    nums, target = [3, 5, 6], 33
    assert check_countdown("6*5+3", nums, target)
    assert check_countdown("3 + 5 × 6", nums, target)
    assert check_countdown("(6*5)+3 = 33", nums, target)
    assert not check_countdown("(6*5)+3 = 34", nums, target)
    assert not check_countdown("6*5+3+0", nums, target)  # 0 is not an allowed number
    assert not check_countdown("6*6-3", nums, target)  # 6 twice, 5 never
    assert not check_countdown("6*5", nums, 30)  # must use every number
    assert not check_countdown("5*6+3-3+3", nums, target)
    assert not check_countdown("6**2-3", nums, target)
    assert not check_countdown("__import__('os')", nums, target)
    assert not check_countdown("3/(5-5)*6", [3, 5, 5, 6], 0)
    assert check_countdown("(6-3)*5/5", [3, 5, 5, 6], 3)  # exact rational arithmetic
    assert check_countdown("7/2*2", [7, 2, 2], 7)  # true division, not floor: 7/2 is 3.5
    assert check_countdown("6 ÷ 3 + 5", [3, 5, 6], 7)  # the division sign, as the worked steps write it
    # a long answer is refused, not evaluated to a RecursionError that crashes the reward
    assert not check_countdown("+".join(["1"] * 1500), [1] * 1500, 1500)


def test_linear_equation_accepts_x_equals():
    task = get_task("linear_equation")
    p = task.problems("test", 1, seed=0)[0]
    assert task.score(p, f"t</think>x = {p.answer}") == 1.0
    assert task.score(p, f"t</think>y = {p.answer}") == 0.0


def _worked_lines(specs: tuple[str, ...], seed: int, n: int = 60):
    """Every line of the worked steps of n training problems of each task spec, in their languages."""
    for spec in specs:
        task = get_task(spec)
        for p in task.problems("train", n, seed=seed):
            yield from task.steps(p.meta, p.language).split("\n")


def test_every_column_step_is_one_small_sum():
    """Column addition adds a carry after the digits' own sum (`1 + 6 + 1 = 7 + 1 = 8`), never three
    terms in one step; the lines are right in every language, and in multiplication's final sum too."""
    steps = get_task("addition").steps({"op": "add", "a": 19, "b": 38}, "en").split("\n")
    assert steps[:2] == ["ones: 9 + 8 = 17, write 7 carry 1", "tens: 1 + 3 + 1 = 4 + 1 = 5"]
    seen = 0
    for line in _worked_lines(("addition", "multiplication", "arithmetic?ops=add&digits=4"), seed=2):
        if not re.search(r": \d \+ \d \+ \d = ", line):
            continue
        m = re.search(r": (\d) \+ (\d) \+ (\d) = (\d+) \+ (\d) = (\d+)", line)
        assert m, line
        x, y, c, s, c_again, total = map(int, m.groups())
        assert (s, c_again, total) == (x + y, c, x + y + c), line
        seen += 1
    assert seen > 50


def test_linear_equation_works_the_new_constant_in_columns():
    task = get_task("linear_equation")
    steps = task.steps({"a": 4, "b": 6, "d": 0, "e": 14, "x": 2}, "en").split("\n")
    assert steps == [
        "Subtract 6 from both sides: 4x = 14 - 6",
        "ones: 14 - 6 = 8, borrow 1",
        "tens: 1 - 1 = 0",
        "4x = 8",
        "Divide both sides by 4: x = 8 ÷ 4",
        "4 × 1 = 4 < 8",
        "4 × 2 = 8",
        "x = 2",
    ]
    # x on both sides, a negative constant (difficulty 3); every problem's steps end at its answer
    steps = task.steps({"a": 5, "b": -44, "d": 3, "e": 22, "x": 33}, "zh").split("\n")
    assert steps[1:3] == ["两边加上 44: 2x = 22 + 44", "个位: 2 + 4 = 6"]
    for k in (1, 2, 3):
        hard = get_task(f"linear_equation?difficulty={k}")
        for p in hard.problems("train", 30, seed=k):
            assert hard.steps(p.meta, p.language).split("\n")[-1].endswith(f"= {p.answer}")


def test_a_borrow_is_taken_before_the_digit_below_is_subtracted():
    """One small difference per step: `7 - 1 - 4 = 6 - 4 = 2`; every line right, in every language."""
    steps = get_task("subtraction").steps({"op": "sub", "a": 73, "b": 48}, "en").split("\n")
    assert steps[:2] == ["ones: 13 - 8 = 5, borrow 1", "tens: 7 - 1 - 4 = 6 - 4 = 2"]
    seen = 0
    for line in _worked_lines(("subtraction", "arithmetic?ops=sub&digits=4", "linear_equation"), seed=4):
        if m := re.search(r": (\d+) - 1 - (\d) = (\d+) - (\d) = (\d+)", line):
            top, sub, less, sub_again, d = map(int, m.groups())
            assert (less, sub_again, d) == (top - 1, sub, top - 1 - sub), line
            seen += 1
        assert not re.search(r" - 1 - \d = \d+(,|、|，|$)", line), line  # never both at once
    assert seen > 30


def test_division_walks_up_the_times_table_one_fact_per_line():
    """x = n ÷ a is found as a's table row, each product beside n until one equals it; every fact right."""
    task = get_task("linear_equation")
    steps = task.steps({"a": 6, "b": 1, "d": 0, "e": 73, "x": 12}, "ja").split("\n")
    assert steps[4:7] == ["両辺を 6 で割る: x = 72 ÷ 6", "6 × 1 = 6 < 72", "6 × 2 = 12 < 72"]
    assert steps[-2:] == ["6 × 12 = 72", "x = 12"]
    for p in task.problems("train", 40, seed=3):
        rows = [
            tuple(int(g) for g in m.groups() if g)
            for m in (
                re.match(r"^(\d+) × (\d+) = (\d+)(?: < (\d+))?$", s)
                for s in task.steps(p.meta, "en").split("\n")
            )
            if m
        ]
        a, x = p.meta["a"], int(p.answer)
        assert [(r[0], r[1], r[2]) for r in rows] == [(a, k, a * k) for k in range(1, x + 1)]
    # a quotient outside the table (difficulty 2's negatives) stays one step
    hard = task.steps({"a": 4, "b": 30, "d": 0, "e": 6, "x": -6}, "en").split("\n")
    assert hard[-1] == "Divide both sides by 4: x = -24 ÷ 4 = -6"


def test_counting_scans_letter_by_letter_under_the_letter_sought():
    task = get_task("counting")
    steps = task.steps({"text": "dadcdcc", "letter": "d"}, "zh").split("\n")
    assert steps == ["d: d(1) a d(2) c d(3) c c", "所以有 3 个。"]


def test_comparison_writes_both_digits_before_their_relation():
    task = get_task("comparison")
    steps = task.steps({"a": 76, "b": 79, "which": "larger"}, "en").split("\n")
    assert steps == [
        "Compare the tens: 7 and 7: 7 = 7",
        "Compare the ones: 6 and 9: 6 < 9",
        "So 79 is larger.",
    ]
    assert (
        task.steps({"a": 47, "b": 29, "which": "smaller"}, "ja").split("\n")[0]
        == "十の位を比べる: 4 と 2: 4 > 2"
    )
    assert task.steps({"a": 7, "b": 79, "which": "larger"}, "en").startswith(
        "7 has 1 digit and 79 has 2 digits"
    )
    for p in task.problems("train", 60, seed=4):
        assert task.score(p, task.worked_solution(p)) == 1.0


def test_sorting_list_formats():
    task = get_task("sorting")
    p = task.make({"numbers": [42, 7, 19, 88]}, "ja")
    assert p.answer == "7, 19, 42, 88"
    for ok in ["7, 19, 42, 88", "[7, 19, 42, 88]", "7、19、42、88", "7 19 42 88"]:
        assert task.score(p, f"t</think>{ok}") == 1.0
    for bad in [
        "7, 19, 88, 42",
        "7, 19, 42",
        "7, 19, 42, 88, 88",
        "sorted: 7, 19, 42, 88",
        "[7, 19, 42, 881",
    ]:
        assert task.score(p, f"t</think>{bad}") == 0.0
    # a gold that is no list (an edited dataset) is skipped, never matched by an answer that is none
    broken = dataclasses.replace(p, answer="seven, nineteen")
    assert task.verify(broken, "t</think>no idea") is None


def test_sorting_steps_cross_out_each_smallest_in_its_place():
    """Each step is the line above copied slot by slot with the smallest just taken crossed out
    ("_"), never the list rewritten without it; the steps name the numbers in sorted order."""
    task = get_task("sorting")
    assert task.steps({"numbers": [36, 90, 45, 38]}, "en").split("\n") == [
        "smallest of 36, 90, 45, 38: 36",
        "smallest of _, 90, 45, 38: 38",
        "smallest of _, 90, 45, _: 45",
        "last: 90",
    ]
    for lang in ("en", "ja", "zh"):
        for p in task.problems("train", 30, seed=2, language=lang):
            lines = task.steps(p.meta, lang).split("\n")
            slots = [str(n) for n in p.meta["numbers"]]
            taken = []
            for line in lines[:-1]:
                shown, smallest = re.fullmatch(
                    r"(?:smallest of )?(.+?)(?: の最小| 中最小)?: (\d+)", line
                ).groups()
                assert shown.split(", ") == slots
                slots[slots.index(smallest)] = "_"
                taken.append(int(smallest))
            assert taken + [int(lines[-1].split(": ")[1])] == sorted(p.meta["numbers"])
            assert task.score(p, task.worked_solution(p)) == 1.0


def test_difficulty_and_options():
    three = get_task("arithmetic?digits=3&ops=add")
    for p in three.problems("train", 50):
        assert p.meta["op"] == "add" and 100 <= p.meta["a"] <= 999 and 100 <= p.meta["b"] <= 999
    hard = get_task("countdown?difficulty=2")
    assert all(len(p.meta["numbers"]) == 4 for p in hard.problems("train", 20))
    assert isinstance(get_task("arithmetic"), ArithmeticTask)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="bad options"):
        get_task("arithmetic?colour=red")
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic?ops=pow")
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic").problems("val", 3)
    with pytest.raises(ValueError, match="language"):
        get_task("arithmetic").problems("train", 3, language="fr")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("arithmetic?digits=abc", "'arithmetic': digits='abc' must be a whole number"),
        ("addition?digits=2.5", "'arithmetic': digits='2.5' must be a whole number"),
        ("sorting?count=four", "'sorting': count='four' must be a whole number"),
        ("countdown?max_target=x", "'countdown': max_target='x' must be a whole number"),
        ("linear_equation?difficulty=hard", "'linear_equation': difficulty='hard' must be a whole number"),
        ("arithmetic?allow_negative=maybe", "allow_negative='maybe' must be true or false"),
        ("rg:basic_arithmetic?partial=maybe", "partial='maybe' must be true or false"),
        ("comparison?digits=0", "digits must be >= 1, got 0"),
        ("largest?digits=-2", "digits must be >= 1, got -2"),
        ("modular?colour=red", "no option 'colour' (it takes: difficulty, wording)"),
    ],
)
def test_a_bad_option_value_is_named_with_what_it_must_be(spec, says):
    """Options are read as the types the family's parameters name, once, for every family: "digits=abc"
    was a TypeError in the middle of a comparison ('<' not supported between 'str' and 'int')."""
    with pytest.raises(ValueError, match=re.escape(says)):
        get_task(spec)


def test_an_option_given_twice_is_refused():
    """`addition?digits=3&digits=4` kept the last value without a word: 4-digit problems for a spec
    that also says 3."""
    for spec in ("addition?digits=3&digits=4", "addition?turn=2&turn=3", "rg:countdown?partial=1&partial=0"):
        with pytest.raises(ValueError, match="given twice"):
            get_task(spec)


def test_options_are_read_as_their_parameters_types():
    assert get_task("counting?alphabet=0123").alphabet == "0123"  # text, as written
    assert get_task("arithmetic?allow_negative=true").allow_negative is True
    assert get_task("arithmetic?allow_negative=0").allow_negative is False
    assert get_task("rg:countdown?partial=1").partial is True  # as the package docstring writes it
    assert get_task("sorting?count=5&max_value=50").count == 5


def test_the_docs_example_is_true_when_run():
    """docs/tasks.md's first example, run line by line: every value a comment shows is the one the
    line gives (its problem drifted once when the draw changed, and the example scored it 0.0)."""
    import ast
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "tasks.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    env: dict = {}
    shown = 0
    for line in code.splitlines():
        stmt, _, comment = line.partition("  # ")
        if not stmt.strip():
            continue
        exec(stmt, env)
        try:  # a value shown in the comment, before any words about it
            want = ast.literal_eval(comment.split("   ")[0])
        except (SyntaxError, ValueError):
            continue
        node = ast.parse(stmt).body[0]
        target = node.targets[0] if isinstance(node, ast.Assign) else node.value
        got = eval(ast.unparse(target), env)
        assert got == (pytest.approx(want) if isinstance(want, float) else want) or (
            isinstance(want, tuple) and got[0] == pytest.approx(want[0]) and got[1:] == want[1:]
        ), (stmt, got, want)
        shown += 1
    assert shown == 4  # the problem, its worked solution, its score, its reward


def test_small_problem_space_runs_dry_with_a_clear_error():
    task = get_task("arithmetic?digits=1&ops=add")  # 55 unordered pairs, ~11 held out
    with pytest.raises(ValueError, match="distinct test problems"):
        task.problems("test", 500)
    pool = task.problems("test", 500, strict=False)  # a training pool takes what there is
    assert 5 < len(pool) < 30 and len({p.id for p in pool}) == len(pool)


def test_a_split_left_empty_by_the_options_is_an_error_not_a_hang():
    """`sorting?count=3&max_value=3` has one problem (0, 1, 2), on the training side: its test split
    drew forever (eval, or a pool with strict=False, hung) instead of saying it is empty."""
    task = get_task("sorting?count=3&max_value=3")
    assert [p.answer for p in task.problems("train", 5, strict=False)] == ["0, 1, 2"]
    for strict in (True, False):
        with pytest.raises(ValueError, match="has no test problems at this size"):
            task.problems("test", 5, strict=strict)


def test_reasoning_gym_adapter_is_binary_by_default():
    task = get_task("rg:basic_arithmetic")
    train, test = task.problems("train", 30, seed=0), task.problems("test", 10, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    p = train[0]
    assert task.score(p, f"t</think>{p.answer}") == 1.0
    assert task.score(p, "t</think>not it") == 0.0
    assert not hasattr(task, "worked_solution")  # nothing to build SFT data from
    with pytest.raises(ValueError, match="unsupported language"):
        task.problems("train", 1, language="ja")
    with pytest.raises(ValueError, match="English"):
        next(task.iter_problems("train", language=("en", "zh")))
    # reasoning-gym's countdown scorer gives partial credit for a wrong expression; ours does not
    cd = get_task("rg:countdown")
    q = cd.problems("train", 1, seed=0)[0]
    raw = cd._scorer.score_answer("1+2", q.meta["entry"])
    assert 0.0 < raw < 1.0
    assert cd.score(q, "t</think>1+2") == 0.0
    assert get_task("rg:countdown?partial=true").score(q, "t</think>1+2") == pytest.approx(raw)


def test_jsonl_tasks(tmp_path):
    rows = [
        {"prompt": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}", "verifier": "math"},
        {"prompt": "Capital of France?", "answer": "Paris"},
        {"prompt": "2+2?", "answer": 4, "split": "test"},
        {"prompt": "Double the input.", "tests": [{"input": "3", "output": "6"}], "split": "test"},
        {"prompt": "bad gold", "answer": "n/a", "verifier": "numeric", "split": "test"},
        {"prompt": "日本の首都は？", "answer": "東京", "split": "train", "reasoning": "日本の首都は東京。"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    task = get_task(f"jsonl:{path}")
    by = {p.prompt: p for p in task.items}
    assert by["2+2?"].meta["verifier"] == "numeric" and by["Capital of France?"].meta["verifier"] == "exact"
    assert by["Double the input."].meta["verifier"] == "code"
    assert by["日本の首都は？"].language == "ja"
    assert task.score(by["What is 1/2 + 1/4?"], "t</think>\\boxed{0.75}") == 1.0
    assert task.score(by["What is 1/2 + 1/4?"], "t</think>\\boxed{1/3}") == 0.0
    assert task.score(by["Capital of France?"], "t</think> Paris.") == 1.0
    assert task.score(by["Capital of France?"], "t</think> Paris or Rome") == 0.0
    assert task.score(by["2+2?"], "t</think>4") == 1.0
    assert task.verify(by["bad gold"], "t</think>4") is None  # unparseable gold: skip, not reward
    assert task.score(by["Double the input."], "t</think>```python\nprint(int(input())*2)\n```") == 1.0
    assert task.worked_solution(by["日本の首都は？"]) == "<think>\n日本の首都は東京。\n</think>\n東京"
    with pytest.warns(UserWarning, match="only 3 exist"):
        test_prompts = {p.prompt for p in task.problems("test", 10)}
    assert {"2+2?", "Double the input.", "bad gold"} <= test_prompts
    assert "日本の首都は？" not in test_prompts
    # strict=False is "up to n", as the base Task has it (GRPO's pool, --train-pool 2048 by default):
    # all there is, without the warning `nanoseek grpo --task jsonl:FILE` printed on every run
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {p.prompt for p in task.problems("test", 10, strict=False)} == test_prompts

    for bad, msg in [
        ({"answer": "1"}, "prompt"),
        ({"prompt": "p", "answer": "1", "verifier": "regex"}, "verifier"),
        ({"prompt": "p", "verifier": "code"}, "tests"),
        ({"prompt": "p"}, "answer"),
        # no test at all passes any code that runs (or, empty, skips every sample); a syntax error fails all
        ({"prompt": "p", "verifier": "code", "tests": ""}, "no statements"),
        ({"prompt": "p", "tests": "  \n# to do\n"}, "no statements"),
        ({"prompt": "p", "tests": []}, "tests"),
        ({"prompt": "p", "tests": "assert sq(3) =="}, "not valid Python"),
        (
            [
                {"prompt": "Write f.", "tests": "assert f() == 1"},
                {"prompt": "Write f.", "tests": "assert f() == 2"},
            ],
            "line 1",
        ),
    ]:
        bad_path = tmp_path / f"bad_{msg}.jsonl"
        bad_path.write_text("".join(json.dumps(b) + "\n" for b in (bad if isinstance(bad, list) else [bad])))
        with pytest.raises(ValueError, match=msg):
            get_task(f"jsonl:{bad_path}")
    with pytest.raises(FileNotFoundError):
        get_task(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_code_is_the_last_python_block():
    from nanoseek.data.tasks.answers import extract_code

    code = "print(int(input()) * 2)\n"
    for answer in [
        f"```python\n{code}```",
        f"```python3\n{code}```",
        f"```Py\n{code}```",
        f"```python\r\n{code}```",
        f"Run it with:\n```bash\npython sol.py < in.txt\n```\nThe code:\n```python\n{code}```",
        f"Input:\n```text\n3\n```\n```\n{code}```",
        f"```python\n{code}```\nFor 3 it prints:\n```\n6\n```",
        f"```python\nprint(0)\n```\nFixed:\n```python\n{code}```",
        f"1. The code:\n   ```python\n   {code}   ```",
    ]:
        assert extract_code(answer).strip() == code.strip(), answer
    assert extract_code(code) == code  # no fence: the whole answer


def test_nanoseek_tasks_reexports():
    import nanoseek.tasks as t

    assert t.get_task is get_task and t.Problem is Problem


def test_long_multiplication_steps_are_right():
    """Every line of a multiplication's worked solution is one true fact (a digit times a digit, then
    plus a carry, a partial product, a column sum), and the steps end at the answer, in every language."""
    task = get_task("arithmetic?ops=mul&digits=3")
    for lang in ("en", "ja", "zh"):
        for p in task.problems("train", 40, seed=1, language=lang):
            a, b = p.meta["a"], p.meta["b"]
            steps = task.steps(p.meta, lang)
            for m in re.finditer(r"^(\d) × (\d)(?: \+ (\d) = (\d+) \+ (\d))? = (\d+)", steps, re.M):
                x, d, c, product, c_again, v = (int(g or 0) for g in m.groups())
                assert x * d + c == v and c == c_again, m.group()
                # a carry is added to the table fact written out, never inside one step
                assert (product == x * d) if c else m.group(4) is None, m.group()
            for m in re.finditer(r"^(\d{2,}) × (\d+) = (\d+)$", steps, re.M):
                assert int(m[1]) * int(m[2]) == int(m[3]), m.group()
            partials = [int(m[3]) for m in re.finditer(r"^(\d{2,}) × (\d+) = (\d+)$", steps, re.M)]
            assert sum(partials) == a * b and len(partials) == len(str(b))
            assert steps.rstrip("。.").endswith(f"{a} × {b} = {a * b}")
            assert task.score(p, task.worked_solution(p)) == 1.0
    one = get_task("arithmetic?ops=mul")  # 2-digit x 1-digit: one partial product, no column sum
    p = one.problems("train", 1, seed=0, language="en")[0]
    assert "+ " not in one.steps(p.meta, "en").split("\n")[0] and "ones:" not in one.steps(p.meta, "en")


def test_a_problem_asked_later_in_a_chat_is_the_same_problem_after_others_and_their_answers():
    from nanoseek.data.tasks import ChatTurnTask, as_second_turn, is_later_turn

    alone = get_task("comparison").problems("test", 12, seed=3)
    spec = as_second_turn("comparison")
    assert spec == "comparison?turn=2" and is_later_turn(spec) and not is_later_turn("comparison?turn=1")
    later = get_task(spec).problems("test", 12, seed=3)
    assert [p.id for p in later] == [p.id for p in alone]  # pairs problem by problem with the task alone
    before = {}  # what each language's chats ask first: training problems of that language, in turn
    for a, p in zip(alone, later, strict=True):
        assert (p.prompt, p.answer, p.language) == (a.prompt, a.answer, a.language) and a.history == ()
        (q, ans), last = p.history, p.messages[-1]
        assert (q["role"], ans["role"]) == ("user", "assistant") and last == {
            "role": "user",
            "content": p.prompt,
        }
        it = before.setdefault(p.language, get_task("comparison").iter_problems("train", 4, p.language))
        earlier = next(it)
        assert (q["content"], ans["content"]) == (earlier.prompt, earlier.answer)  # with its answer
        assert get_task(p.task).verify(p, f"x</think>{p.answer}", require_think=True) == 1.0
    third = get_task("sorting?turn=3").problems("test", 3, seed=0)
    assert all(len(p.history) == 4 for p in third)
    assert isinstance(get_task("addition?turn=2"), ChatTurnTask)  # aliases too
    assert not hasattr(get_task("addition?turn=2"), "worked_solution")  # SFT data would lose the history
    for bad in ("addition?turn=0", "addition?turn=two"):
        with pytest.raises(ValueError, match="turn"):
            get_task(bad)


def test_huge_exponent_is_refused_quickly():
    # Fraction('1e999999999') builds 10**999999999: a 12-character answer hung the reward
    t = time.perf_counter()
    assert parse_number("1e10000000") is None and parse_number("1e-999999999") is None
    assert check_numeric("42", "1e999999999") == 0.0
    assert time.perf_counter() - t < 1.0
    assert parse_number("1e3") == 1000 and parse_number("2.5e-3") == parse_number("0.0025")


def test_long_operands_have_golds_the_verifier_reads():
    """`arithmetic?digits=33&ops=mul` asks for 65-digit products: their golds were unparseable (over 64
    characters), so every such problem was skipped and its right answer never scored."""
    for spec in ("arithmetic?digits=33&ops=mul", "arithmetic?digits=64&ops=add", "comparison?digits=70"):
        task = get_task(spec)
        problems = task.problems("test", 6, seed=0)
        assert max(len(p.answer) for p in problems) > 64
        for p in problems:
            assert task.verify(p, f"t</think>\n{p.answer}") == 1.0, spec
            assert task.verify(p, f"t</think>\n{p.answer[:-1]}") == 0.0, spec


def test_non_integer_gold_never_overflows():
    # compared as floats: OverflowError crashed the reward
    assert check_numeric("3.5", "1e400") == 0.0
    assert check_numeric("3.5", "3.5000001") == 1.0  # relative tolerance kept for non-integers


def test_integer_gold_is_exact():
    # a relative tolerance of 1e-6 applied when only one side was an integer
    assert check_numeric("42", "42.0") == 1.0
    assert check_numeric("42", "42.00001") == 0.0
    assert check_numeric("123456", "123456.1") == 0.0


def test_linear_equation_accepts_boxed_and_dollar_x_equals():
    task = get_task("linear_equation")
    p = task.problems("test", 1, language="en")[0]
    for a in (f"\\boxed{{x = {p.answer}}}", f"$x = {p.answer}$", f"x = {p.answer}"):
        assert task.verify(p, "t</think>\n" + a, require_think=True) == 1.0


def test_countdown_accepts_trailing_full_stop():
    task = get_task("countdown")
    p = task.problems("test", 1, language="en")[0]
    assert task.verify(p, f"t</think>\n{p.answer}.", require_think=True) == 1.0
    assert task.verify(p, f"t</think>\n{p.answer}。", require_think=True) == 1.0


def test_full_width_digits_and_signs_are_the_ascii_answer():
    """A ja/zh answer typed with a CJK input method: "１７" scored, but not "－１７", "ｘ＝－４" or a
    countdown "（３＋６）＊６"; a wrong one still scores 0."""
    full = str.maketrans("0123456789-+*/()=", "０１２３４５６７８９－＋＊／（）＝")
    for spec in ("linear_equation?difficulty=2", "arithmetic?ops=sub&allow_negative=true", "countdown"):
        task = get_task(spec)
        for p in task.problems("test", 40, seed=0, language="ja"):
            typed = p.answer.translate(full)
            assert task.score(p, f"t</think>\n{typed}") == 1.0, (p.prompt, typed)
            if spec.startswith("linear"):
                assert task.score(p, f"t</think>\nｘ＝{typed}") == 1.0
            if spec != "countdown":
                assert task.score(p, f"t</think>\n{typed}１") == 0.0
    assert parse_number("－３.５") == parse_number("−3.5") == parse_number("-3.5")
    assert not check_countdown("（３＋６）＊６", [3, 6, 6], 55)


def test_a_full_width_decimal_point_and_separator_are_the_ascii_ones():
    """A CJK input method's decimal point and separator: "３．５" and "１，０００" were no number, so a
    decimal answer typed in full width scored 0 where its digits alone were read."""
    assert parse_number("－３．５") == parse_number("-3.5") and parse_number("１，０００") == 1000
    assert check_numeric("2.5", "２．５") == 1.0 and check_numeric("2.5", "２．６") == 0.0


def test_word_problem_commuted_twin_shares_the_split():
    # 12 + 11 and 11 + 12 were split apart: held-out problems had their twin in training
    task = get_task("word_problem")
    for p in task.problems("test", 100, language="en", strict=False):
        k, a, b = p.meta["kind"], p.meta["a"], p.meta["b"]
        if k in ("add", "mul"):
            assert split_of(task.split_key({**p.meta, "a": b, "b": a})) == "test"


def test_a_word_problem_is_on_the_side_of_the_arithmetic_problem_it_asks():
    """A story that asks 12 + 15 ("Tom has 12 apples and gets 15 more") is arithmetic's 12 + 15: split
    apart, a held-out sum or difference was worked, with its answer, in the other family's training
    problems in every run that trains both."""
    story, arith = get_task("word_problem"), get_task("arithmetic?digits=1")
    for split in ("train", "test"):
        for p in story.problems(split, 120, seed=3, language="en"):
            twin = arith.make({"op": p.meta["kind"], "a": p.meta["a"], "b": p.meta["b"]}, "en")
            assert twin.meta["split"] == split, (p.prompt, twin.prompt)


def test_no_training_linear_equation_works_a_held_out_arithmetic_problem():
    """A linear equation's worked solution subtracts its constant column by column and walks the times
    table up to x: 327 of the 1,539 training equations (the speedrun's corpus and cold start) worked a
    held-out 2-digit subtraction or product, with its answer. Such equations are in neither split; the held-out
    equations are the same as before."""
    import re

    lin, arith = get_task("linear_equation"), get_task("arithmetic")
    held = {p.meta["split"] for p in arith.problems("test", 5, seed=0)}
    assert held == {"test"}
    worked = 0
    for p in lin.problems("train", 400, seed=1, language="en"):
        text = lin.steps(p.meta, "en")
        for left, right in re.findall(r"= (\d+) - (\d+)$", text, flags=re.M):
            if len(left) == len(right):
                worked += 1
                twin = arith.make({"op": "sub", "a": int(left), "b": int(right)}, "en")
                assert twin.meta["split"] == "train", (p.prompt, twin.prompt)
        for a, k in re.findall(r"^(\d) × (1[0-2]) = ", text, flags=re.M):
            assert arith.make({"op": "mul", "a": int(k), "b": int(a)}, "en").meta["split"] == "train", (
                p.prompt
            )
    assert worked > 50  # the check ran on equations that do work a subtraction
    test = lin.problems("test", 200, seed=0)
    assert all(split_of(lin.split_key(p.meta)) == "test" for p in test)


def test_reasoning_gym_split_keeps_a_reordered_problem_on_one_side():
    # "1 giraffe, 2 dogs" and "2 dogs, 1 giraffe" are one problem: the split must not hold it on both sides
    task = get_task("rg:leg_counting?min_animals=2&max_animals=2&max_instances=2")
    train = task.problems("train", 600, seed=0, strict=False)
    test = task.problems("test", 150, seed=0, strict=False)
    key = lambda p: frozenset(p.meta["entry"]["metadata"]["animals"].items())  # noqa: E731
    seen = {key(p) for p in train}
    assert not [p.prompt for p in test if key(p) in seen]


def test_reasoning_gym_options_take_the_config_types():
    assert get_task("rg:binary_matrix?p_zero=0.9").config["p_zero"] == 0.9  # was the text '0.9': refused
    ops = get_task("rg:basic_arithmetic?operators=+,-&min_terms=2&max_terms=2").config["operators"]
    assert list(ops) == ["+", "-"]  # was '+,-', iterated as '+', ',', '-'


def test_math_verifier_reads_latex_display_and_inline_math():
    # "\\[ \\frac{3}{4} \\]" was wrapped again as "$\\[...\\]$", which math-verify parses to nothing: 0
    for a in ("\\[ \\frac{3}{4} \\]", "\\[\n\\frac{3}{4}\n\\]", "\\(\\frac{3}{4}\\)", "\\frac{3}{4}", "0.75"):
        assert check_math("\\frac{3}{4}", a) == 1.0, a
    assert check_math("\\frac{3}{4}", "So \\[ \\frac{3}{4} \\]") == 1.0  # math after words
    assert check_math("\\[ \\frac{3}{4} \\]", "0.75") == 1.0
    assert check_math("\\frac{3}{4}", "\\[ \\frac{2}{3} \\]") == 0.0


def test_a_non_integer_gold_is_matched_as_math_isclose_matches_it():
    """rel_tol 1e-6 and abs_tol 1e-9, as math.isclose: a small gold (0.0001) is matched within the
    absolute tolerance, which its relative one alone (1e-10) is far below."""
    import math

    for gold, pred in [
        ("0.0001", "0.0001000005"),  # within abs_tol only
        ("0.0001", "0.000100002"),  # outside both
        ("3.5", "3.5000034"),  # within rel_tol
        ("3.5", "3.50001"),  # outside both
    ]:
        want = math.isclose(float(gold), float(pred), rel_tol=1e-6, abs_tol=1e-9)
        assert check_numeric(gold, pred) == float(want), (gold, pred)


def test_a_fraction_reads_its_sign_before_the_numerator():
    """`-7/2` is a negative fraction, as `-\\frac{7}{2}` is, and `\\frac{-7}{2}` the same number (LaTeX
    typesets the sign inside, math-verify reads it so): the latter scored a right answer 0."""
    from fractions import Fraction

    assert parse_number("-7/2") == Fraction(-7, 2) and parse_number("+7/2") == Fraction(7, 2)
    assert check_numeric("-3.5", "-7/2") == 1.0 and check_numeric("3.5", "-7/2") == 0.0
    assert parse_number("\\frac{-7}{2}") == Fraction(-7, 2)
    assert parse_number("-\\dfrac{-7}{2}") == Fraction(7, 2)
    assert check_numeric("-0.5", "\\boxed{\\frac{-1}{2}}") == 1.0
    assert check_numeric("0.5", "\\frac{-1}{2}") == 0.0


def test_answers_in_latex_math_mode_and_latex_fractions_are_read():
    # `$42$` was accepted but `\\(42\\)` / `\\[42\\]` (the same inline / display math) scored 0, and so did
    # `\\frac{7}{2}` against a numeric gold of 3.5
    assert check_numeric("42", "\\(42\\)") == 1.0 and check_numeric("42", "\\[ 42 \\].") == 1.0
    assert check_numeric("3.5", "\\boxed{\\frac{7}{2}}") == 1.0
    assert check_numeric("-0.5", "-\\dfrac{1}{2}") == 1.0
    assert check_numeric("3.5", "\\frac{7}{3}") == 0.0 and parse_number("\\frac{7}{0}") is None
    assert check_numeric("42", "\\(41\\) or \\(42\\)") == 0.0
    for spec, answer in [
        ("sorting", "\\[{}\\]"),
        ("linear_equation", "\\(x = {}\\)"),
        ("countdown", "\\({}\\)"),
    ]:
        task = get_task(spec)
        p = task.problems("test", 1, language="en")[0]
        assert task.verify(p, "t</think>\n" + answer.format(p.answer), require_think=True) == 1.0, spec


def test_jsonl_null_or_empty_answer_is_refused(tmp_path):
    for i, row in enumerate([{"prompt": "2+2?", "answer": None}, {"prompt": "2+2?", "answer": "  "}]):
        path = tmp_path / f"a{i}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match='missing "answer"'):
            get_task(f"jsonl:{path}")


def test_jsonl_language_outside_en_ja_zh_is_refused_at_load(tmp_path):
    """The language reward scores en, ja and zh only: another value failed GRPO at its first such problem."""
    path = tmp_path / "fr.jsonl"
    path.write_text(json.dumps({"prompt": "Combien font 2+2 ?", "answer": "4", "language": "fr"}) + "\n")
    with pytest.raises(ValueError, match=r"fr\.jsonl:1: language 'fr' is not one of \('en', 'ja', 'zh'\)"):
        get_task(f"jsonl:{path}")


def test_jsonl_lines_that_are_not_utf8_or_reasoning_that_is_not_text_are_named(tmp_path):
    """A cp1252 line was a bare UnicodeDecodeError (no file, no line); a "reasoning" list became its
    Python repr inside the worked solution SFT trains on."""
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "2+2?", "answer": 4}\n{"prompt": "caf\xe9?", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not valid UTF-8"):
        get_task(f"jsonl:{path}")
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "reasoning": ["2+2", "=4"]}) + "\n")
    with pytest.raises(ValueError, match=r'steps\.jsonl:1: "reasoning" must be text, got list'):
        get_task(f"jsonl:{path}")


@pytest.mark.parametrize("indent", [2, None])
def test_a_jsonl_task_saved_as_one_json_array_says_so(tmp_path, indent):
    """Problems saved as one JSON array (`json.dump(rows)`) were "invalid JSON" at its `[` (or a line
    without "prompt"), not what the reader takes instead: one object per line."""
    path = tmp_path / "qa.json"
    path.write_text(
        json.dumps([{"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": 6}], indent=indent)
    )
    with pytest.raises(
        ValueError, match=r"qa\.json:1: .*; this line opens a JSON array: JSON lines hold one object"
    ):
        get_task(f"jsonl:{path}")


def test_jsonl_split_with_no_problems_is_an_error_that_says_why(tmp_path):
    """A file whose lines are all "split": "train" drew no test problems, silently: eval then said "all
    0 problems have unparseable gold answers", SFT (a file all in test) 'no worked solutions ... add
    "reasoning"' to a file whose lines had it."""
    from nanoseek.train.sft import task_conversations

    path = tmp_path / "train_only.jsonl"
    rows = [
        {"prompt": f"{i}+1?", "answer": i + 1, "reasoning": "add one", "split": "train"} for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}")
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"train_only\.jsonl: no test problems among its 3"):
            task.problems("test", 64, strict=strict)
    test_only = tmp_path / "test_only.jsonl"
    test_only.write_text(path.read_text().replace('"train"', '"test"'))
    with pytest.raises(ValueError, match=r"test_only\.jsonl: no train problems among its 3"):
        task_conversations(f"jsonl:{test_only}", 2000)


def test_largest_keeps_the_line_that_decides_each_comparison():
    """Each of the two comparisons keeps every place it compares: cut at two lines, 693 vs 695 lost
    the ones place that decides it (3-digit numbers: ~2% of traces)."""
    task = get_task("largest?difficulty=2")
    steps = task.steps({"numbers": [693, 695, 932]}, "en").split("\n")
    assert "Compare the ones: 3 and 5: 3 < 5" in steps and steps[-1] == "So 932 is the largest."
    for k in (1, 2, 3):
        t = get_task(f"largest?difficulty={k}")
        pair = get_task("comparison")
        for p in t.problems("train", 200, seed=k):
            a, b, c = p.meta["numbers"]
            lines = t.steps(p.meta, p.language).split("\n")
            for x, y in ((a, b), (max(a, b), c)):
                decide = pair.steps({"a": x, "b": y, "which": "larger"}, p.language).split("\n")[-2]
                assert decide in lines, (p.prompt, lines)
            assert t.score(p, t.worked_solution(p)) == 1.0


def _written_number(lines: list[str]) -> int:
    """The number a column method's lines write, ones place first: each line's last value gives its
    place's digit (what it writes, the carry going on), the last line its whole value."""
    values = [
        int(re.findall(r"= (\d+)", line)[-1]) if "=" in line else int(line.split(": ")[-1]) for line in lines
    ]
    return int(str(values[-1]) + "".join(str(v % 10) for v in reversed(values[:-1])))


def test_column_methods_carry_into_the_next_place():
    """Every line of a column sum or a digit's product can be true while the carry it announces never
    reaches the next place; the digits the lines write must make up the result."""
    import random

    from nanoseek.data.tasks.families import _column_add, _column_sub, _mul_by_digit

    rng = random.Random(0)
    for _ in range(500):
        a, b, d = rng.randint(0, 99999), rng.randint(0, 99999), rng.randint(1, 9)
        for lang in ("en", "ja", "zh"):
            add = _column_add(a, b, lang)
            assert _written_number(add) == a + b and "carry" not in add[-1] and "繰り上" not in add[-1], add
            assert _written_number(_mul_by_digit(a, d, lang)) == a * d
            big, small = max(a, b), min(a, b)
            sub = _column_sub(big, small, lang)
            assert (
                int("".join(re.findall(r"(\d+)(?:[,、，].*)?$", s)[0] for s in reversed(sub))) == big - small
            ), sub


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_every_step_of_every_worked_solution_is_true(name):
    """Each `=` chain of plain arithmetic in a worked solution (`6 - 1 - 2 = 5 - 2 = 3`, `7 × 11 = 77 <
    80`) holds, and the solution scores, for many draws of each family in each language and level."""
    number = r"[\d\s+\-×()]+"
    for spec in (name, f"{name}?difficulty=2"):
        task = get_task(spec)
        for lang in ("en", "ja", "zh"):
            for p in task.problems("train", 150, seed=11, language=lang):
                worked = task.worked_solution(p)
                assert task.score(p, worked) == 1.0, (p.prompt, worked)
                for line in task.steps(p.meta, lang).split("\n"):
                    for clause in re.split(r"[,，、]", line.rsplit(": ", 1)[-1]):
                        values = set()
                        for side in clause.split("="):
                            side, _, bound = side.partition("<")
                            if re.fullmatch(number, side) and re.search(r"\d", side):
                                values.add(eval(side.replace("×", "*")))
                                if bound.strip().isdigit():
                                    assert eval(side.replace("×", "*")) < int(bound), (p.prompt, line)
                        assert len(values) <= 1, (p.prompt, line)


@pytest.mark.parametrize("name", ["sorting", "largest", "countdown"])
def test_a_reordered_problem_is_one_problem(name):
    """The same numbers in another order are one problem, with one id and one split (as commuted sums
    are): else a held-out problem's twin, the same numbers shuffled, is trained on."""
    import random

    task = get_task(name)
    rng = random.Random(0)
    for p in task.problems("test", 100, seed=0, language="en"):
        if len(set(p.meta["numbers"])) == 1:
            continue
        shuffled = p.meta["numbers"][:]
        while shuffled == p.meta["numbers"]:
            rng.shuffle(shuffled)
        twin = task.make({**p.meta, "numbers": shuffled}, "zh")
        assert (twin.id, twin.meta["split"], twin.answer if name != "countdown" else "") == (
            p.id,
            "test",
            p.answer if name != "countdown" else "",
        )


def test_comparison_asks_for_the_side_it_answers_in_every_language():
    """The prompt asks for the larger number exactly when the answer is the larger one, in every
    language and wording (a template that asked for the smaller one in Japanese still scored its own
    answer 1.0)."""
    words = {
        "en": {"larger": ("larger", "greater", "bigger"), "smaller": ("smaller", "less")},
        "ja": {"larger": ("大きい", "最大"), "smaller": ("小さい",)},
        "zh": {"larger": ("大",), "smaller": ("小",)},
    }
    task = get_task("comparison")
    for lang, asked in words.items():
        for p in task.problems("train", 200, seed=4, language=lang):
            which = p.meta["which"]
            other = "smaller" if which == "larger" else "larger"
            assert p.answer == str(
                max(p.meta["a"], p.meta["b"]) if which == "larger" else min(p.meta["a"], p.meta["b"])
            )
            assert any(w in p.prompt for w in asked[which]) and not any(
                w in p.prompt for w in asked[other]
            ), p.prompt


def test_word_problems_tell_the_same_story_in_every_language():
    """Each kind of story says what its operation does in every language: gaining for a sum, giving
    away for a difference, boxes for a product (a difference told as a gain still scored its answer)."""
    says = {
        "en": {"add": "gets", "sub": "gives away", "mul": "boxes"},
        "ja": {"add": "もらいました", "sub": "あげました", "mul": "箱"},
        "zh": {"add": "又得到", "sub": "送出", "mul": "盒子"},
    }
    task = get_task("word_problem")
    for lang, verbs in says.items():
        for p in task.problems("train", 60, seed=0, language=lang):
            kind = p.meta["kind"]
            assert verbs[kind] in p.prompt, p.prompt
            assert not any(v in p.prompt for k, v in verbs.items() if k != kind), p.prompt


@pytest.mark.parametrize("name", [n for n in BUILTIN_TASKS if n != "countdown"])  # many right answers
def test_one_id_one_answer(name):
    """An id names one problem: two draws with one id ask for one answer, and two different
    questions (the larger of two numbers, the smaller) are two problems, each on its own side."""
    import itertools

    task = get_task(name)
    answers: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for p in itertools.islice(task.iter_problems(split, seed=5, language="en"), 2000):
            answers.setdefault(p.id, set()).add(p.answer)
    assert all(len(a) == 1 for a in answers.values()), [a for a in answers.values() if len(a) > 1][:3]


def test_a_later_turn_asks_other_problems_before_it():
    """`turn=N` asks N - 1 *other* problems first: in the train split (what GRPO's second-turn tasks
    draw) the history held the very problem asked, with its answer, for 2 of 300 problems."""
    for p in get_task("modular?turn=3").problems("train", 300, seed=0):
        assert p.prompt not in [m["content"] for m in p.history], p.messages


def test_a_later_turn_of_a_one_problem_training_split_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A JSONL file whose training split holds one problem has no other to ask before it: turn=2 of that
    problem looped forever drawing the same one (eval --split train, GRPO), where it should say so."""
    path = tmp_path / "one.jsonl"
    rows = [
        {"prompt": "2 + 2?", "answer": "4", "split": "train"},
        {"prompt": "3 + 3?", "answer": "6", "split": "test"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}?turn=2")
    assert task.problems("test", 1)[0].history[0]["content"] == "2 + 2?"  # another problem: fine
    endless = task.inner.iter_problems  # a bounded stream here, so that the old loop fails, not hangs
    monkeypatch.setattr(task.inner, "iter_problems", lambda *a, **k: itertools.islice(endless(*a, **k), 5000))
    with pytest.raises(ValueError, match=r"turn=2: the training split holds no problem in 'en' but the one"):
        task.problems("train", 1)


def test_jsonl_answers_that_are_json_values_are_read_as_json(tmp_path):
    """A list, object or boolean answer is the JSON the user wrote ('["a", "b"]', 'true'), not Python's
    repr of it ("['a', 'b']", 'True'), which no model answering in JSON matched; numbers stay as written."""
    rows = [
        {"prompt": "Letters?", "answer": ["a", "b"]},
        {"prompt": "Is it?", "answer": True, "reasoning": "yes"},
        {"prompt": "Point?", "answer": {"x": 1}},
        {"prompt": "Tenth?", "answer": 0.1},
        {"prompt": "Count?", "answer": 42},
        {"prompt": "Zero?", "answer": 0},
    ]
    path = tmp_path / "typed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}")
    by = {p.prompt: p for p in task.items}
    assert [by[r["prompt"]].answer for r in rows] == ['["a", "b"]', "true", '{"x": 1}', "0.1", "42", "0"]
    assert [by[r["prompt"]].meta["verifier"] for r in rows] == ["exact"] * 3 + ["numeric"] * 3
    assert task.score(by["Letters?"], 't</think>["a", "b"]') == 1.0
    assert task.score(by["Is it?"], "t</think>true") == 1.0
    assert task.worked_solution(by["Is it?"]) == "<think>\nyes\n</think>\ntrue"
    assert task.score(by["Tenth?"], "t</think>0.10") == 1.0 and task.score(by["Zero?"], "t</think>0") == 1.0


def test_jsonl_problems_in_a_language_the_file_lacks_is_an_error(tmp_path):
    """As for every other task: language="fr" (or "ja" for an English file) is refused by name, not an
    empty list with a warning that the split is too small."""
    path = tmp_path / "en.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(20)))
    task = get_task(f"jsonl:{path}")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "日本の首都は？", "answer": "東京"}) + "\n" + path.read_text())
    assert get_task(f"jsonl:{mixed}").languages == ("en", "ja")
    for lang in ("fr", "ja"):
        with pytest.raises(ValueError, match=rf"unsupported language '{lang}'; this task has \('en',\)"):
            task.problems("train", 2, language=lang)
    assert len(task.problems("train", 2, language="en")) == 2


def test_reasoning_gym_whole_number_option_that_is_not_one_is_named():
    """min_terms=x reached reasoning-gym as the text 'x': "'>' not supported between instances of 'str'
    and 'int'", the error the built-in families' options were typed to avoid."""
    for spec in ("rg:basic_arithmetic?min_terms=x", "rg:basic_arithmetic?min_terms=2.5"):
        with pytest.raises(
            ValueError, match=r"option min_terms='.*' of rg:basic_arithmetic must be a whole number"
        ):
            get_task(spec)
    from nanoseek.data.tasks import ReasoningGymTask

    assert ReasoningGymTask("rg:basic_arithmetic", "basic_arithmetic", min_terms="3").config["min_terms"] == 3


def test_reasoning_gym_list_of_float_options_are_read():
    """list[float] fields (a dataset's weights) were read as one number: "must be a number"."""
    t = get_task("rg:simple_equations?operators_weights=0.4,0.4,0.2")
    assert t.config["operators_weights"] == [0.4, 0.4, 0.2]
    with pytest.raises(
        ValueError, match=r"operators_weights='0.4,heavy' of rg:simple_equations must be a number"
    ):
        get_task("rg:simple_equations?operators_weights=0.4,heavy")


def test_a_task_keeps_its_whole_spec_as_its_name():
    """Problems say which task (with its options) made them: GRPO pools and eval reports key on it, and
    get_task(p.task) must give back the task that verifies p."""
    for spec in ("arithmetic?ops=add", "rg:basic_arithmetic?partial=true"):
        task = get_task(spec)
        assert task.name == spec and task.problems("train", 1)[0].task == spec
    assert get_task("multiplication?digits=2").digits == 2  # the user's option over the alias's digits=3


def test_jsonl_task_name_keeps_its_options(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "split": "train"}) + "\n")
    spec = f"jsonl:{path}?partial=true"
    assert get_task(spec).name == spec and get_task(spec).problems("train", 1)[0].task == spec


def test_a_jsonl_task_under_the_home_directory_is_read(tmp_path, monkeypatch):
    """`--task 'jsonl:~/probs é.jsonl'`: no shell expands `~` after "jsonl:", and the task was "file not
    found: ~/probs é.jsonl" where every flag that names a file reads it as the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "probs é.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": 4}) + "\n")
    assert len(get_task("jsonl:~/probs é.jsonl").items) == 1


def test_jsonl_task_reads_shards_folders_globs_and_gzip(tmp_path):
    """`jsonl:` read one plain file: a .jsonl.gz was "not valid UTF-8", a folder or glob of shards "file not
    found" (`sft --data` takes them); errors name the shard and its line."""
    import gzip

    def lines(rows):
        return "".join(
            json.dumps({"prompt": f"{k}+1?", "answer": k + 1, "split": "train"}) + "\n" for k in rows
        )

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-00000-of-00002.jsonl").write_text(lines(range(3)))
    (shards / "train-00001-of-00002.jsonl.gz").write_bytes(gzip.compress(lines(range(3, 5)).encode()))
    (shards / "README.md").write_text("# a dataset card\n")
    assert len(get_task(f"jsonl:{shards / 'train-00001-of-00002.jsonl.gz'}").items) == 2
    with pytest.warns(UserWarning, match=r"left out of the data \(README.md\)"):
        folder = get_task(f"jsonl:{shards}")
    assert [p.prompt for p in folder.items] == [f"{k}+1?" for k in range(5)]
    assert len({p.id for p in folder.items}) == 5 and folder.problems("train", 5)
    (shards / "train-00001-of-00002.jsonl").write_text(lines([1]))
    with pytest.raises(
        ValueError, match=r"train-00001-of-00002.jsonl:1: same problem id as .*00000-of-00002.jsonl:2"
    ):
        get_task(f"jsonl:{shards}/*.jsonl")
    (shards / "train-00001-of-00002.jsonl").write_text(lines([7]) + '{"prompt": "8+1?"}\n')
    with pytest.raises(ValueError, match=r"train-00001-of-00002.jsonl:2: missing \"answer\""):
        get_task(f"jsonl:{shards}/*.jsonl")
    with pytest.raises(FileNotFoundError, match="jsonl task file not found"):
        get_task(f"jsonl:{tmp_path / 'none.jsonl'}")


def test_a_rewritten_jsonl_file_is_read_again(tmp_path):
    """get_task cached a `jsonl:` task for the life of the process: a notebook that fixed its problems
    file and evaluated (or trained) again got the problems it had read first."""
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": 2, "split": "test"}) + "\n")
    first = get_task(f"jsonl:{path}")
    assert get_task(f"jsonl:{path}") is first  # unchanged: the one built
    rows = [
        {"prompt": "2+2?", "answer": 4, "split": "test"},
        {"prompt": "3+3?", "answer": 6, "split": "train"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.answer for p in get_task(f"jsonl:{path}").problems("test", 1)] == ["4"]
    assert [p.answer for p in get_task(f"jsonl:{path}?turn=2").problems("test", 1)] == ["4"]
    assert get_task(f"jsonl:{path}") is get_task(f"jsonl:{path}")  # built again once, then cached
    path.unlink()
    with pytest.raises(FileNotFoundError, match="jsonl task file not found"):
        get_task(f"jsonl:{path}")


def test_register_task_checks_the_name_and_replaces_a_cached_task():
    from nanoseek.data.tasks import TASKS, register_task

    with pytest.raises(ValueError, match="lowercase identifiers"):
        register_task("My-Task", ArithmeticTask)
    try:
        register_task("mine", ArithmeticTask)
        assert isinstance(get_task("mine"), ArithmeticTask)
        register_task("mine", lambda spec: get_task("sorting"))
        assert get_task("mine").name == "sorting"  # not the cached arithmetic
    finally:
        TASKS.pop("mine", None)
        get_task.cache_clear()


def test_reasoning_gym_verdicts_for_no_answer_a_near_miss_and_a_scorer_error(monkeypatch):
    task = get_task("rg:leg_counting")
    p = task.problems("train", 1, seed=0)[0]
    # no closed think block: no answer, scored 0 (None would skip the sample: a way out of the penalty)
    assert task.verify(p, f"thinking {p.answer}", require_think=True) == 0.0
    raw = task._scorer.score_answer("x" + p.answer, p.meta["entry"])  # contains the oracle: len ratio
    assert 0.5 <= raw < 1.0 and task.verify(p, f"t</think>x{p.answer}") == 0.0
    monkeypatch.setattr(task._scorer, "score_answer", lambda *a: 1 / 0)
    assert task.verify(p, f"t</think>{p.answer}") == 0.0


def test_reasoning_gym_answer_is_scored_in_the_sandbox_not_run_in_the_trainer(tmp_path):
    """binary_matrix's scorer eval()s the answer: `__import__('os').system(...)` ran a shell command in
    the trainer and `exit()` raised SystemExit out of verify. Now one sandboxed child scores the batch."""
    from nanoseek.data.rewards import score_pairs

    task = get_task("rg:binary_matrix")
    p, q = task.problems("train", 2, seed=0)
    marker = tmp_path / "ran"
    answers = [p.answer, f"__import__('os').system('touch {marker}')", "exit()", q.answer, "[[0]]"]
    problems = [p, p, p, q, q]
    got = score_pairs(
        lambda prob, text: task.verify(prob, text), problems, [f"t</think>{a}" for a in answers]
    )
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0] and not marker.exists()
    assert task.verify(q, f"t</think>{q.answer}") == 1.0  # a single answer, outside any batch
    # string comparisons stay in this process: reasoning-gym's default scorer and the allow-listed ones
    assert get_task("rg:leg_counting")._in_process() and get_task("rg:chain_sum")._in_process()
    assert not task._in_process()


def test_reasoning_gym_answer_cannot_forge_its_score_or_the_next_ones():
    """The answers run in the scoring child, which printed "<index> <score>" lines: an answer that wrote
    "0 1.0" to fd 1 scored 1.0 (a reward hack GRPO would learn), one that read the lines so far back from
    /proc/self/fd/1 forged every later answer's, and one that replaced builtins.float scored those after it."""
    from nanoseek.data.rewards import score_pairs

    task = get_task("rg:binary_matrix")
    p, q = task.problems("train", 2, seed=0)
    os_ = "__import__('os')"
    forge_rest = (  # the lines so far say its index
        f"{os_}.write(1, ''.join('%d 1.0\\n' % k for k in range("
        "len(open('/proc/self/fd/1').read().splitlines()) - 1, 99)).encode())"
    )
    answers = [
        f"{os_}.write(1, b'0 1.0\\n')", p.answer, "[setattr(__import__('builtins'), 'float', lambda *a: 1.0), 0]",
        "[[0]]", forge_rest, "[[0]]", q.answer,
    ]  # fmt: skip
    problems = [p, p, p, p, p, p, q]
    got = score_pairs(
        lambda prob, text: task.verify(prob, text), problems, [f"t</think>{a}" for a in answers]
    )
    assert got == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_reasoning_gym_answer_that_patches_the_scorer_does_not_score_the_next_ones():
    """One child scored a batch in one interpreter: an answer that replaced the scorer's code (it is
    eval'd there) made every later answer in the batch score 1.0, wrong ones included (a reward hack).
    Each answer now runs in a fresh fork of the process that imported reasoning-gym."""
    from nanoseek.data.rewards import score_pairs

    task = get_task("rg:binary_matrix")
    p, q = task.problems("train", 2, seed=0)
    cls = "__import__('reasoning_gym').algorithmic.binary_matrix.BinaryMatrixDataset"
    poison = f"[setattr({cls}.score_answer, '__code__', (lambda self, answer, entry: 1.0).__code__), 0]"
    answers = [poison, "[[0]]", "[[1]]", p.answer, "[[0]]", q.answer]
    problems = [p, p, p, p, q, q]
    got = score_pairs(
        lambda prob, text: task.verify(prob, text), problems, [f"t</think>{a}" for a in answers]
    )
    assert got == [0.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_reasoning_gym_prescored_batch_is_kept_until_verify_reads_it(monkeypatch):
    """A batch larger than the score cache (a big eval's samples), or a score cached earlier and then
    evicted by the batch's new ones, was scored again by verify: a sandboxed child per answer."""
    import collections

    from nanoseek.data.tasks import adapters, prescore

    children = []

    def fake(dataset, config, jobs):
        children.append(len(jobs))
        return [1.0 if a == e["answer"] else 0.0 for a, e in jobs]

    monkeypatch.setattr(adapters, "_rg_score_sandboxed", fake)
    monkeypatch.setattr(adapters, "_RG_SCORES", collections.OrderedDict())
    monkeypatch.setattr(adapters, "_RG_SCORES_MAX", 2)
    task = get_task("rg:binary_matrix")
    ps = task.problems("train", 4, seed=0)
    texts = [f"t</think>{p.answer}" for p in ps]
    prescore(ps[:3], texts[:3])  # three answers, a cache of two
    assert [task.verify(ps[i], texts[i]) for i in range(3)] == [1.0] * 3 and children == [3]
    batch = [0, 3]  # the oldest cached score and a new one
    prescore([ps[i] for i in batch], [texts[i] for i in batch])
    assert [task.verify(ps[i], texts[i]) for i in batch] == [1.0] * 2 and children == [3, 1]


def test_reasoning_gym_answer_that_hangs_waits_out_a_chunk_not_the_whole_batch(monkeypatch):
    """The child's timeout grew with the batch (0.1 s an answer): one answer that hangs sympy in an
    eval's thousands of samples held the eval for many minutes. A child scores a bounded chunk."""
    import base64
    import pickle

    from nanoseek.data import sandbox
    from nanoseek.data.tasks import adapters
    from nanoseek.data.tasks.adapters import _rg_score_sandboxed

    timeouts = []

    def fake(code, preload=(), timeout=0.0, secret="", **kw):  # "ready", then "<i> <score> <mac>"
        timeouts.append(timeout)
        data = re.search(r"b64decode\('([^']*)'\)", code).group(1)
        _, _, jobs, start = pickle.loads(base64.b64decode(data))
        lines = [f"{i} {float(a == e['answer'])!r}" for i, (a, e) in enumerate(jobs) if i >= start]
        lines = [f"{line} {adapters._rg_mac(secret, line)}" for line in lines]
        return sandbox.SandboxResult(0, "\n".join(["ready", *lines]) + "\n", "", False, 0.1)

    monkeypatch.setattr(sandbox, "run_python", fake)
    entry = {"answer": "7"}
    jobs = [("7" if i % 3 else "8", entry) for i in range(3000)]
    assert _rg_score_sandboxed("countdown", {}, jobs) == [float(i % 3 != 0) for i in range(3000)]
    assert len(timeouts) > 1 and max(timeouts) < 60


def test_reasoning_gym_answer_that_hangs_its_scorer_scores_zero_and_the_rest_are_scored():
    """countdown's scorer hands the answer to sympy, which computes `9**9**9**9`: GRPO hung on it."""
    from nanoseek.data.rewards import score_pairs

    task = get_task("rg:countdown")
    p = task.problems("train", 1, seed=0)[0]
    texts = [f"t</think>{a}" for a in ("9**9**9**9", p.answer)]  # one child: the hang, then a right one
    assert score_pairs(lambda prob, text: task.verify(prob, text), [p, p], texts) == [0.0, 1.0]


def test_reasoning_gym_right_answer_whose_run_ran_out_of_its_clock_is_scored_again(monkeypatch):
    """Each answer's run has a wall clock (2 s), which on a loaded machine runs out while a right answer
    waits for a CPU: it scored 0, and where the first run's ran out before it wrote "ready", the batch's
    scoring raised (a training step failed). Such runs are tried once more, with longer clocks."""
    from nanoseek.data import sandbox
    from nanoseek.data.tasks import adapters

    task = get_task("rg:binary_matrix")
    p, q = task.problems("train", 2, seed=0)
    jobs = [(p.answer, p.meta["entry"]), (q.answer, q.meta["entry"]), ("[[0]]", p.meta["entry"])]
    real, calls = sandbox.run_python, []

    def starved(killed):  # the first child: the runs in `killed` ran out of their clocks, the others scored
        def fake(code, secret="", **kw):
            calls.append(kw)
            if len(calls) > 1:
                return real(code, secret=secret, **kw)
            lines = ["ready"] if 0 not in killed else []
            for i, (answer, entry) in enumerate(jobs):
                if i not in killed:
                    line = f"{i} {float(answer == entry['answer'])!r}"
                    lines.append(f"{line} {adapters._rg_mac(secret, line)}")
            stderr = "".join(f"sandbox: run {i} timed out\n" for i in killed)
            return sandbox.SandboxResult(0, "".join(f"{line}\n" for line in lines), stderr, False, 1.0)

        return fake

    for killed in ({1}, {0, 2}):
        calls.clear()
        monkeypatch.setattr(sandbox, "run_python", starved(killed))
        assert adapters._rg_score_sandboxed(task.dataset, task.config, jobs) == [1.0, 1.0, 0.0]
        assert calls[1]["timeout"] > calls[0]["timeout"]


def test_reasoning_gym_split_ignores_the_difficulty_it_was_drawn_at():
    """The same problem drawn under another config (difficulty, draw index) is on the same side."""
    from nanoseek.data.tasks.adapters import _rg_canonical

    entry = {"question": "q", "answer": "6", "metadata": {"animals": {"dog": 1, "cat": 1}}}
    keys = {
        _rg_canonical({**entry, "metadata": {**entry["metadata"], **extra}})
        for extra in ({}, {"difficulty": {"num_animals": (1, 3)}, "source_index": 4, "source_dataset": "x"})
    }
    assert len(keys) == 1


def test_reasoning_gym_puzzle_with_several_solutions_is_on_one_side():
    """puzzle24's gold answer is one solution drawn at random: in the split key, the same four numbers
    drawn twice were two problems, and 25 of 64 held-out puzzles were in a 2,048-problem training pool."""
    from nanoseek.data.tasks.adapters import _rg_canonical

    entry = {
        "question": "Make 24 using 1, 2, 3, 4.",
        "metadata": {"source_dataset": "puzzle24", "numbers": [1, 2, 3, 4]},
    }
    keys = {_rg_canonical({**entry, "answer": a}) for a in ("1*2*3*4", "(1+2+3)*4")}
    assert len(keys) == 1


def test_reasoning_gym_puzzle_drawn_again_is_on_one_side():
    """kakurasu numbers its draws "source_idx" (not "source_index"): one puzzle drawn twice was two
    problems, each on its own side of the split."""
    import reasoning_gym

    from nanoseek.data.tasks.adapters import _rg_canonical

    # reasoning-gym draws item i of seed s from Random(s + i): the same puzzle, another index
    a, b = (
        reasoning_gym.create_dataset("kakurasu", seed=1, size=2)[1],
        reasoning_gym.create_dataset("kakurasu", seed=2, size=1)[0],
    )
    assert a["question"] == b["question"] and a["metadata"]["source_idx"] != b["metadata"]["source_idx"]
    assert _rg_canonical(a) == _rg_canonical(b)


def test_reasoning_gym_problems_come_from_the_split_asked_for():
    from nanoseek.data.tasks.adapters import _rg_canonical

    task = get_task("rg:basic_arithmetic")
    for split in ("train", "test"):
        for p in task.problems(split, 10, seed=0):
            assert split_of(f"rg:basic_arithmetic|{_rg_canonical(p.meta['entry'])}") == split


def test_jsonl_code_partial_credit_is_the_fraction_of_cases_passed(tmp_path):
    path = tmp_path / "code.jsonl"
    cases = [{"input": "3", "output": "6"}, {"input": "0", "output": "1"}]
    path.write_text(json.dumps({"prompt": "Double.", "tests": cases}) + "\n")
    solution = "t</think>```python\nprint(int(input()) * 2)\n```"
    for spec, want in ((f"jsonl:{path}", 0.0), (f"jsonl:{path}?partial=true", 0.5)):
        task = get_task(spec)
        assert task.verify(task.items[0], solution) == want


def test_reasoning_gym_seed_draws_other_problems():
    task = get_task("rg:basic_arithmetic")
    ids = [{p.id for p in task.problems("train", 8, seed=s)} for s in (0, 0, 1)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_reasoning_gym_right_answer_in_a_box_or_with_a_full_stop_scores():
    """Most reasoning-gym scorers compare the text exactly: a right `\\boxed{42}` or `42.` scored 0 where
    the built-in tasks read through that markup."""
    for name in ("basic_arithmetic", "letter_counting", "word_sorting"):
        task = get_task(f"rg:{name}")
        p = task.problems("test", 1, seed=0)[0]
        for written in (f"\\boxed{{{p.answer}}}", f"{p.answer}.", f"${p.answer}$", f" {p.answer} "):
            assert task.score(p, f"t</think>{written}") == 1.0, (name, written)
        assert task.score(p, "t</think>\\boxed{not it}") == 0.0


def test_reasoning_gym_dataset_without_a_gold_answer_is_scored_by_its_own_scorer():
    """graph_color checks a coloring against the graph (no single gold answer): every problem was
    skipped as "unparseable gold", so eval refused the task and GRPO learned nothing."""
    task = get_task("rg:graph_color")
    p = task.problems("train", 1, seed=0)[0]
    coloring = {str(k): v for k, v in p.meta["entry"]["metadata"]["possible_answer"].items()}
    assert task.verify(p, f"t</think>{json.dumps(coloring)}") == 1.0
    assert task.verify(p, "t</think>{}") == 0.0


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("rg:basic_arithmetc", "did you mean rg:basic_arithmetic"),
        ("rg:chain_sum?bogus=1", "no option 'bogus' (it takes: partial, min_terms,"),
        ("rg:letter_counting?size=5", "size is not a task option"),
        ("rg:letter_counting?seed=3", "seed is not a task option"),
    ],
)
def test_reasoning_gym_bad_dataset_or_option_is_named(spec, says):
    """A misspelled dataset was "not registered" without the names near it, a bad option reasoning-gym's
    "__init__() got an unexpected keyword", `size`/`seed` "got multiple values for keyword 'size'"."""
    with pytest.raises(ValueError, match=re.escape(says)):
        get_task(spec)


def test_jsonl_problems_of_one_language_count_only_that_language(tmp_path):
    rows = [{"prompt": f"{i}+1?", "answer": i + 1, "split": "train"} for i in range(2)]
    rows += [{"prompt": f"{i}たす1は？", "answer": i + 1, "split": "train"} for i in range(3)]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.warns(UserWarning, match="asked for 3 train problems, only 2 exist"):
        got = get_task(f"jsonl:{path}").problems("train", 3, language="en")
    assert sorted(p.prompt for p in got) == ["0+1?", "1+1?"]
    stream = get_task(f"jsonl:{path}").iter_problems("train", language="en")
    assert {next(stream).language for _ in range(20)} == {"en"}


def test_jsonl_seed_reorders_and_the_whole_split_asked_for_is_no_warning(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1?", "answer": i + 1, "split": "train"}) + "\n" for i in range(30)
        )
    )
    task = get_task(f"jsonl:{path}")
    orders = [[p.id for p in task.problems("train", 5, seed=s)] for s in (0, 0, 1)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for exactly what the split holds is not "too few"
        assert len(task.problems("train", 30)) == 30


def test_jsonl_ids_empty_files_and_unknown_splits(tmp_path):
    path = tmp_path / "ids.jsonl"
    rows = [
        {"prompt": "Same?", "answer": "a", "id": "q1"},
        {"prompt": "Same?", "answer": "b", "id": "q2"},  # one prompt twice, told apart by "id"
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(p.id, p.answer) for p in get_task(f"jsonl:{path}").items] == [("q1", "a"), ("q2", "b")]
    numbered = tmp_path / "numbered.jsonl"  # an id of 0 is one; 1 and "1" name the same problem
    numbered.write_text(
        "".join(json.dumps({"prompt": "Same?", "answer": "a", "id": i}) + "\n" for i in (0, 1))
    )
    assert [p.id for p in get_task(f"jsonl:{numbered}").items] == ["0", "1"]
    twice = tmp_path / "twice.jsonl"
    twice.write_text(numbered.read_text() + json.dumps({"prompt": "Other?", "answer": "c", "id": "1"}) + "\n")
    with pytest.raises(ValueError, match="twice.jsonl:3: same problem id as line 2"):
        get_task(f"jsonl:{twice}")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.jsonl: no problems"):
        get_task(f"jsonl:{blank}")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "p", "answer": "1", "split": "validation"}) + "\n")
    with pytest.raises(
        ValueError, match=r"val\.jsonl:1: split 'validation' is not one of \('train', 'test'\)"
    ):
        get_task(f"jsonl:{val}")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        json.dumps({"prompt": "p", "tests": [{"input": "3", "output": "6"}, {"input": "4"}]}) + "\n"
    )
    with pytest.raises(ValueError, match='each test case needs "output"'):
        get_task(f"jsonl:{cases}")


def test_jsonl_file_with_a_byte_order_mark_loads(tmp_path):
    # Notepad and Excel's "UTF-8" export start the file with a BOM; the SFT and corpus readers skip it too
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + (json.dumps({"prompt": "What is 2 + 2?", "answer": 4}) + "\n").encode()
    )
    (problem,) = get_task(f"jsonl:{path}").items
    assert (problem.prompt, problem.answer) == ("What is 2 + 2?", "4")


def test_split_task_list_keeps_option_commas() -> None:
    assert split_task_list("arithmetic?ops=add,sub,countdown") == ["arithmetic?ops=add,sub", "countdown"]
    assert split_task_list("rg:leg_counting,jsonl:/x.jsonl") == ["rg:leg_counting", "jsonl:/x.jsonl"]
    # a piece with options of its own is a task, named or not: a misspelled family is said to be unknown,
    # not read as one more value of the option before it
    assert split_task_list("arithmetic?ops=add,sub,arithmatic?digits=2") == [
        "arithmetic?ops=add,sub",
        "arithmatic?digits=2",
    ]
    with pytest.raises(ValueError):
        split_task_list(" , ")


def test_split_task_list_gives_each_flag_and_each_bare_name_a_task_of_its_own() -> None:
    """`--task sorting --task nosuchtask` was merged into one task, 'sorting,nosuchtask', and refused by
    that name; so was `--task sorting,nosuchtask`: a task without options has no option a comma continues."""
    assert split_task_list(["sorting", "nosuchtask"]) == ["sorting", "nosuchtask"]
    assert split_task_list("sorting,nosuchtask") == ["sorting", "nosuchtask"]
    assert split_task_list(["arithmetic?ops=add", "mul"]) == ["arithmetic?ops=add", "mul"]
    assert split_task_list("jsonl:/data/a,b.jsonl,sorting") == ["jsonl:/data/a,b.jsonl", "sorting"]
    with pytest.raises(ValueError, match="unknown task 'nosuchtask'"):
        get_task(split_task_list("sorting,nosuchtask")[1])


def test_n_digit_operands_have_exactly_n_digits() -> None:
    import random

    from nanoseek.data.tasks.families import _rand_digits

    rng = random.Random(0)
    # every 1-digit number (0 included) and every 2-digit one is drawn, and nothing else
    assert {_rand_digits(rng, 1) for _ in range(2000)} == set(range(10))
    assert {_rand_digits(rng, 2) for _ in range(5000)} == set(range(10, 100))


def test_an_answer_is_read_without_the_space_around_it():
    """With or without a think tag, the answer is the text without the blank lines and spaces around it:
    a scorer that compares text exactly (reasoning-gym's) or runs it as code reads what was written."""
    assert extract_answer("  42 \n\n") == "42"
    assert extract_answer("\n\tprint(1)\n") == "print(1)"
    assert extract_answer("t</think>\n\n 42 \n") == "42"


def test_a_number_may_start_at_its_decimal_point():
    """`.5` is 0.5, as Python and most people read it (`-.25`, `.5e1` alike)."""
    assert parse_number(".5") == Fraction(1, 2) and parse_number("-.25") == Fraction(-1, 4)
    assert parse_number(".5e1") == 5
    assert check_numeric("0.5", ".5") == 1.0 and check_numeric("0.5", "\\boxed{.5}") == 1.0


def test_a_non_integer_gold_uses_the_larger_magnitude_and_its_bound_as_math_isclose_does():
    """math.isclose scales rel_tol by the larger of the two magnitudes and accepts a difference equal to
    the tolerance: 0.5 vs 0.5000005000001 differs by more than 1e-6 of the gold but less than 1e-6 of
    the answer; the bounds with tolerances exact in binary (0.5, 0.25)."""
    import math

    from nanoseek.data.tasks.answers import numbers_equal

    gold, pred = "0.5", "0.5000005000001"
    assert math.isclose(float(gold), float(pred), rel_tol=1e-6, abs_tol=1e-9)
    assert abs(float(pred) - float(gold)) > 1e-6 * float(gold)  # outside of the gold's scale alone
    assert check_numeric(gold, pred) == 1.0
    for g, p, rel, abs_ in [(0.5, 1.0, 0.5, 0.0), (0.5, 0.75, 0.0, 0.25), (0.5, 1.0, 0.25, 0.0)]:
        want = math.isclose(g, p, rel_tol=rel, abs_tol=abs_)
        assert numbers_equal(Fraction(g), Fraction(p), rel_tol=rel, abs_tol=abs_) is want, (g, p, rel, abs_)


def test_an_answer_of_markup_alone_is_no_answer_for_the_vote():
    """`\\boxed{}`, `$ $.`: no answer, not an answer "" that could outvote the right one in cons@k."""
    from nanoseek.data.tasks.answers import answer_key

    for empty in ("\\boxed{}", "$ $.", "。", "\\( \\)"):
        assert answer_key(empty) is None, empty
    assert answer_key("\\boxed{ Paris }.") == "Paris" and answer_key("$42$") == 42


def test_a_full_stop_inside_inline_math_closes_the_answer():
    """`\\(Paris.\\)` and `\\[ 42。 \\]`: the sentence's full stop typed inside the math, as `$42.$` is."""
    assert check_exact("Paris", "\\(Paris.\\)") == 1.0 and check_exact("Paris", "\\[ Paris。 \\]") == 1.0
    assert check_numeric("42", "\\[ 42。 \\]") == 1.0 and check_numeric("42", "\\(42..\\)") == 1.0


def test_latex_text_style_fractions_are_read():
    """\\tfrac (text-style) is \\frac as \\dfrac is."""
    assert parse_number("\\tfrac{7}{2}") == Fraction(7, 2) and check_numeric("-3.5", "-\\tfrac{7}{2}") == 1.0


def test_code_blocks_that_are_not_the_programs_are_skipped_and_indented_ones_dedented():
    """Without a ```python block the last untagged one is the program, not a later ```text block of its
    output; a block indented under a list item is dedented (else its every line is an IndentationError)."""
    from nanoseek.data.tasks.answers import extract_code

    code = "for i in range(2):\n    print(i)\n"
    assert extract_code(f"```\n{code}```\nIt prints:\n```text\n0\n1\n```") == code
    assert (
        extract_code("Install it:\n```bash\npip install x\n```") == "Install it:\n```bash\npip install x\n```"
    )
    indented = "".join("   " + line + "\n" for line in code.splitlines())
    assert extract_code(f"1. The code:\n   ```python\n{indented}   ```") == code


def test_a_blank_code_answer_scores_zero_without_running(monkeypatch):
    """A blank answer is no program: 0, and no sandbox started for it (even where the expected output is
    empty, which an empty program would print)."""
    import nanoseek.data.tasks.answers as answers

    def run(code, tests):
        raise AssertionError("ran the sandbox for a blank answer")

    monkeypatch.setattr(answers, "run_code_tests", run)
    answers._cached_code_run.cache_clear()
    assert answers.check_code([{"input": "", "output": ""}], " \n\t") == 0.0
    answers._cached_code_run.cache_clear()


def test_a_registered_family_that_takes_any_option_gets_them_as_parsed():
    """A factory with ``**options`` takes any option, each read as written: a whole number (negative
    ones too), true/false, else the text."""
    from nanoseek.data.tasks import TASKS, ArithmeticTask, register_task

    got = {}

    def factory(spec, **options):
        got.update(options)
        return ArithmeticTask(spec=spec)

    try:
        register_task("anyopts", factory)
        get_task("anyopts?offset=-3&count=12&strict=true&label=-x")
        assert got == {"offset": -3, "count": 12, "strict": True, "label": "-x"}
    finally:
        TASKS.pop("anyopts", None)
        get_task.cache_clear()


def test_an_option_without_a_name_is_refused_as_written():
    from nanoseek.data.tasks.base import parse_task_spec

    for spec in ("sorting?=3", "sorting?count=5&=3"):
        with pytest.raises(ValueError, match="expected key=value"):
            parse_task_spec(spec)


def test_specs_rewritten_for_other_wordings_drop_empty_options():
    """A stray ``&`` (`sorting?count=5&`) is no option: the spec of its held-out wordings is the one the
    report pairs it with, `sorting?count=5&wording=unseen`."""
    from nanoseek.data.tasks import in_unseen_wordings
    from nanoseek.data.tasks.base import spec_without

    assert in_unseen_wordings("sorting?count=5&") == "sorting?count=5&wording=unseen"
    assert spec_without("sorting?&count=5&&wording=unseen", "wording") == "sorting?count=5"


def test_a_turn_of_true_is_refused():
    with pytest.raises(ValueError, match="turn must be a whole number"):
        get_task("comparison?turn=true")


def test_zero_problems_are_none():
    """`problems(split, 0)`: none, in every language and each one (it drew one, or with the languages
    balanced, ran dry with "only 0 distinct test problems ... asked for 0")."""
    for name in ("arithmetic", "comparison?turn=2"):
        task = get_task(name)
        assert task.problems("test", 0) == [] and task.problems("train", 0, language="ja") == []


def _problem(i: int, language: str) -> Problem:
    return Problem(id=f"p{i}", prompt=f"q{i}", answer=str(i), language=language, task="two")


def test_a_task_of_two_languages_gives_each_half():
    """balance_languages holds for any number of languages past one: a task of two (a user's) gives n/2
    in each, though its stream opens with a run of one language."""
    from nanoseek.data.tasks import Task

    class TwoLanguages(Task):
        name, languages, balance_languages = "two", ("en", "ja"), True

        def iter_problems(self, split, seed=0, language=None):
            for i in range(1000):
                yield _problem(i, "en" if i < 10 or i % 2 else "ja")

    problems = TwoLanguages().problems("test", 6)
    assert sorted(p.language for p in problems) == ["en"] * 3 + ["ja"] * 3


def test_a_long_run_of_repeats_after_many_problems_is_not_the_split_running_dry():
    """A draw gives up after 1000 repeats in a row, plus 20 for each problem found so far: a large split's
    last problems come after long runs of ones already drawn (here 1,500 after 30 found, under 1,600)."""
    from nanoseek.data.tasks import Task

    class Repeats(Task):
        name = "repeats"

        def __init__(self, run: int) -> None:
            self.run = run

        def iter_problems(self, split, seed=0, language=None):
            yield from (_problem(i, "en") for i in range(30))
            yield from (_problem(0, "en") for _ in range(self.run))
            while True:
                yield _problem(30, "en")

    assert [p.id for p in Repeats(1500).problems("test", 31)][-1] == "p30"
    with pytest.raises(ValueError, match="only 30 distinct"):  # past 1,600: it has run dry
        Repeats(1700).problems("test", 31)


def test_score_is_zero_where_the_gold_cannot_be_read():
    task = get_task("arithmetic")
    p = dataclasses.replace(task.problems("test", 1)[0], answer="not a number")
    assert task.verify(p, "42") is None and task.score(p, "42") == 0.0


def test_a_task_name_starts_with_a_letter():
    from nanoseek.data.tasks import register_task

    for bad in ("", "2digits", "_private"):
        with pytest.raises(ValueError, match="lowercase identifiers"):
            register_task(bad, lambda spec: get_task("sorting"))


def test_a_task_looked_up_to_score_its_own_problems_is_not_read_again(tmp_path):
    """`get_task(spec, reread=False)` (GRPO's rewards): the task as built, though its file changed since;
    without it, the file is read again."""
    import json

    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": 2, "split": "test"}) + "\n")
    first = get_task(f"jsonl:{path}")
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "split": "test"}) + "\n\n")
    assert get_task(f"jsonl:{path}", reread=False) is first
    assert [p.answer for p in get_task(f"jsonl:{path}").problems("test", 1)] == ["4"]


def test_a_family_registered_in_a_built_ins_place_is_a_registered_one():
    """`registered_tasks()` holds a built-in name whose factory was replaced (a spawned process registers
    it again), and no built-in left as it was."""
    from nanoseek.data.tasks import TASKS, register_task, registered_tasks

    builtin = TASKS["sorting"]
    mine = lambda spec: get_task("comparison")  # noqa: E731
    try:
        register_task("sorting", mine)
        assert registered_tasks()["sorting"] is mine
    finally:
        register_task("sorting", builtin)
    assert "sorting" not in registered_tasks()


def test_a_task_list_starts_a_new_task_at_an_alias():
    from nanoseek.data.tasks import split_task_list

    assert split_task_list("arithmetic?ops=add,sub,addition") == ["arithmetic?ops=add,sub", "addition"]
    assert split_task_list("comparison,subtraction") == ["comparison", "subtraction"]


def test_a_factory_that_refuses_its_options_is_named_with_them():
    """A registered factory whose parameters cannot be read (a callable object) gets the options as parsed;
    one it does not take is a ValueError naming the task, not a TypeError out of its call."""
    from nanoseek.data.tasks import TASKS, register_task

    class Factory:
        def __call__(self, spec):
            return get_task("sorting")

    try:
        register_task("callable", Factory())
        assert get_task("callable").name == "sorting"
        with pytest.raises(ValueError, match="bad options for task 'callable'"):
            get_task("callable?colour=red")
    finally:
        TASKS.pop("callable", None)
        get_task.cache_clear()


def test_reasoning_gym_answers_asked_later_in_a_chat_are_prescored(monkeypatch):
    """`rg:<name>?turn=N` scores as its dataset does: its answers are prescored in one batch too (else a
    sandboxed child per answer)."""
    from nanoseek.data.tasks import prescore
    from nanoseek.data.tasks.adapters import ReasoningGymTask

    batches = []
    monkeypatch.setattr(ReasoningGymTask, "prescore", lambda self, ps, cs: batches.append((self.dataset, cs)))
    problems = get_task("rg:chain_sum?turn=2").problems("test", 2, seed=0)
    prescore(problems, ["7", "8"])
    assert batches == [("chain_sum", ["7", "8"])]


def test_one_han_character_without_kana_is_chinese():
    """As detect_language says: Han without kana is 'zh', one character too (a one-word prompt)."""
    from nanoseek.data.tasks.adapters import detect_language

    assert (
        detect_language("猫？") == "zh"
        and detect_language("ねこ？") == "ja"
        and detect_language("cat?") == "en"
    )


def test_reasoning_gym_split_key_reads_metadata_keyed_by_tuples_and_numbers():
    """Metadata keyed by cells (`{(0, 1): 2}`) or by numbers and names together: JSON takes neither as they
    are (a TypeError out of the split), so each key is its text, in any order."""
    import json

    from nanoseek.data.tasks.adapters import _rg_canonical

    entry = {"question": "q", "answer": "a", "metadata": {"grid": {(0, 1): 2, 3: "x", "n": [{(1, 1): 0}]}}}
    want = json.dumps({"grid": {"(0, 1)": 2, "3": "x", "n": [{"(1, 1)": 0}]}}, sort_keys=True) + "|a"
    assert _rg_canonical(entry) == want
    reordered = {
        "question": "q2",
        "answer": "a",
        "metadata": {"grid": {"n": [{(1, 1): 0}], 3: "x", (0, 1): 2}},
    }
    assert _rg_canonical(reordered) == want


def test_a_gzipped_jsonl_files_problems_have_the_ids_of_the_same_file_unzipped(tmp_path):
    """A file compressed to save space is the same problems: `mine.jsonl.gz`'s ids are `mine.jsonl`'s (the
    held-out ids a run recorded still name them)."""
    import gzip
    import json

    from nanoseek.data.tasks.adapters import JsonlTask

    text = "".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(5))
    (tmp_path / "plain").mkdir()
    (tmp_path / "zipped").mkdir()
    (tmp_path / "plain" / "mine.jsonl").write_text(text)
    with gzip.open(tmp_path / "zipped" / "mine.jsonl.gz", "wt") as f:
        f.write(text)
    plain = JsonlTask("a", str(tmp_path / "plain" / "mine.jsonl"))
    zipped = JsonlTask("b", str(tmp_path / "zipped" / "mine.jsonl.gz"))
    assert [p.id for p in zipped.items] == [p.id for p in plain.items]
    assert all(p.id.startswith("mine/") for p in plain.items)


def test_a_jsonl_line_with_empty_reasoning_has_no_worked_solution(tmp_path):
    """`"reasoning": ""` is no reasoning to imitate: no worked solution (an empty think block to train on)."""
    import json

    from nanoseek.data.tasks import get_task
    from nanoseek.data.tasks.base import worked_solution_of

    path = tmp_path / "r.jsonl"
    rows = [
        {"prompt": "1+1?", "answer": 2, "reasoning": ""},
        {"prompt": "2+2?", "answer": 4, "reasoning": "2+2=4"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}")
    empty, given = sorted(task.items, key=lambda p: p.answer)
    assert worked_solution_of(task, empty) is None
    assert worked_solution_of(task, given) == "<think>\n2+2=4\n</think>\n4"


def test_a_jsonl_file_edited_to_the_same_size_is_read_again(tmp_path):
    """An edit that keeps the file's size (one digit for another) is an edit: read again, by its time."""
    import json
    import os

    from nanoseek.data.tasks import get_task

    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": 2, "split": "test"}) + "\n")
    first = get_task(f"jsonl:{path}")
    with open(path, "r+") as f:  # in place: the same file, the same size
        f.write(json.dumps({"prompt": "1+1?", "answer": 3, "split": "test"}) + "\n")
    later = os.stat(path).st_mtime_ns + 10**9  # (a file system's clock may not tick between the writes)
    os.utime(path, ns=(later, later))
    assert [p.answer for p in get_task(f"jsonl:{path}").problems("test", 1)] == ["3"] and first.items[
        0
    ].answer == "2"


def test_reasoning_gym_partial_credit_stays_in_0_to_1(monkeypatch):
    """A scorer that pays past 1 or below 0 is read as 1 or 0, with partial credit as without."""
    from nanoseek.data.tasks import get_task

    task = get_task("rg:leg_counting?partial=true")
    p = task.problems("train", 1, seed=0)[0]
    for paid, want in [(2.5, 1.0), (-1.0, 0.0), (0.25, 0.25)]:
        monkeypatch.setattr(task._scorer, "score_answer", lambda *a, paid=paid: paid)
        assert task.verify(p, f"t</think>{p.answer}") == want, paid


def test_a_size_whose_answers_its_verifier_cannot_read_is_refused():
    """`arithmetic?digits=501&ops=mul` asked for 1,001-digit products, past the 1,000 characters
    parse_number reads: every gold unparseable, every problem skipped and never scored; a sorting list
    past 500 characters the same; a countdown expression past 200 scored its own solution 0. Refused
    by name, and the largest sizes that are read score their golds."""
    for spec in (
        "arithmetic?digits=501&ops=mul",
        "arithmetic?digits=1000&ops=add",
        "comparison?digits=1001",
        "largest?digits=1001",
        "sorting?count=30&max_value=1000000000000000",
        "countdown?count=80",
    ):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(spec))}: its answers can run to .* past the"):
            get_task(spec)
    for spec in ("arithmetic?digits=500&ops=mul", "comparison?digits=1000", "sorting?difficulty=17"):
        task = get_task(spec)
        for p in task.problems("test", 2, seed=0):
            assert task.verify(p, f"t</think>{p.answer}") == 1.0, spec
    task = get_task("largest?difficulty=1000&digits=2")  # its two comparisons are of 2-digit numbers too
    assert all(task.score(p, task.worked_solution(p)) == 1.0 for p in task.problems("test", 2, seed=0))
    assert check_countdown("+".join(["10"] * 18), [10] * 18, 180)  # 53 characters, read


def test_a_modular_difficulty_whose_numbers_python_cannot_write_is_refused():
    """`modular?difficulty=5000` asks for 5,001-digit dividends: the first problem raised "Exceeds the
    limit (4300 digits) for integer string conversion", naming no task. Refused by name up front."""
    with pytest.raises(ValueError, match=r"'modular\?difficulty=5000': its numbers run to 5,001 digits"):
        get_task("modular?difficulty=5000")
    task = get_task("modular?difficulty=100")
    assert all(task.score(p, task.worked_solution(p)) == 1.0 for p in task.problems("test", 2, seed=0))


def test_sorting_numbers_past_sys_maxsize_are_drawn():
    """`sorting?difficulty=18` draws below 10**19: rng.sample(range(...)) raised OverflowError there
    (a range past sys.maxsize has no len())."""
    task = get_task("sorting?difficulty=18")
    for p in task.problems("test", 3, seed=0):
        numbers = p.meta["numbers"]
        assert len(set(numbers)) == len(numbers) == 21 and all(0 <= x < 10**19 for x in numbers)
        assert task.score(p, task.worked_solution(p)) == 1.0


def test_a_comma_is_a_thousands_separator_only_in_groups_of_three():
    """`0,500` (a European 0.5) was read as 500, `1000,000` as a million, `0.123,456` as 0.123456: a
    comma anywhere before three digits was dropped. Grouped as thousands are written, or no number."""
    for malformed in ("0,500", "-0,500", "1000,000", "0.123,456", "1,000.5,000", "12,3456", "1,000,00"):
        assert parse_number(malformed) is None, malformed
    assert check_numeric("500", "0,500") == 0.0 and check_numeric("1000000", "1000,000") == 0.0
    for grouped, value in [("1,234", 1234), ("-1,234,567.5", Fraction(-2469135, 2)), ("１，０００", 1000)]:
        assert parse_number(grouped) == value, grouped
    assert parse_number("\\frac{1,000}{3}") == parse_number("1,000/3") == Fraction(1000, 3)


# --- properties (hypothesis; the "ci" profile in conftest.py draws the same cases on every run) ---------

_FULL_WIDTH = str.maketrans("0123456789-+*/()=.,", "０１２３４５６７８９－＋＊／（）＝．，")
# text an answer may be: any unicode, and runs of the markup and numbers the parsers look for
_MARKUP = ["\\boxed{", "{", "}", "$", "\\(", "\\)", "\\[", "\\]", "\\frac", "\\dfrac", "</think>", "<think>"]
_ANSWER_BITS = [*_MARKUP, "42", "-", "−", "－", "１", ".", "。", "/", ",", "e", "e999999", "1e400", " ", "\n"]
_ANY_ANSWER = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from([*_ANSWER_BITS, "nan", "NaN", "inf", "-inf", "∞", "9" * 1200]), max_size=20).map(
        "".join
    ),
)


@given(_ANY_ANSWER)
@settings(max_examples=250)
def test_property_answer_parsing_never_raises_and_returns_what_it_promises(text):
    """Any completion is read without an error: a number or None, a score of 0 or 1 (None only for a
    gold that cannot be read), never NaN or inf taken for a number."""
    answer = extract_answer(text, require_think=True)
    assert extract_answer(text) is not None and (answer is None or "</think>" not in answer)
    for read in (unbox, unwrap_answer, parse_int_list, answer_key):
        read(text)
    number = parse_number(text)
    assert number is None or isinstance(number, Fraction)
    for gold in ("42", "-3.5", "7/2", "Paris"):
        assert check_numeric(gold, text) in ((None,) if gold == "Paris" else (0.0, 1.0))
        assert check_exact(gold, text) in (0.0, 1.0)
    assert check_countdown(text, [3, 5, 6], 33) in (True, False)


@given(st.integers(-(10**40), 10**40))
@settings(max_examples=200)
def test_property_a_whole_number_reads_back_in_every_form_numbers_take(n):
    forms = [str(n), f"{n:,}", f"{n:,}".translate(_FULL_WIDTH), str(n).replace("-", "−"), f"{n}.", f"{n}。"]
    forms += [f"\\boxed{{{n}}}", f"${n}$", f"$\\boxed{{{n}}}$.", f"\\({n}\\)", f"\\[ {n} \\]", f" {n} \n"]
    forms += [f"{n}.000", f"{2 * n}/2", f"\\frac{{{2 * n}}}{{2}}", f"{n}e0"]
    for form in forms:
        assert parse_number(form) == n, form
    assert check_numeric(str(n), str(n + 1)) == 0.0 and check_numeric(str(n), f"{n}.5") == 0.0
    # a comma moved one place off its group of three, or after a leading 0, makes no number
    grouped = f"{n:,}"
    for i in (i for i, c in enumerate(grouped) if c == ","):
        left = grouped[: i - 1] + "," + grouped[i - 1] + grouped[i + 1 :]
        right = grouped[:i] + grouped[i + 1] + "," + grouped[i + 2 :]
        assert parse_number(left) is None and parse_number(right) is None, (left, right)
    assert parse_number(f"0,{abs(n) % 1000:03d}") is None


@given(st.fractions(max_denominator=10**6).filter(lambda q: abs(q) < 10**12))
@settings(max_examples=200)
def test_property_a_fraction_reads_back_as_a_ratio_latex_and_decimal(q):
    p, d = q.numerator, q.denominator
    assert (
        parse_number(f"{p}/{d}")
        == parse_number(f"\\frac{{{p}}}{{{d}}}")
        == parse_number(f"\\boxed{{{p}/{d}}}")
        == q
    )
    assert parse_number(f"{'-' if q < 0 else ''}\\dfrac{{{abs(p)}}}{{{d}}}") == q
    decimal = f"{float(q):.17g}"
    assert check_numeric(f"{p}/{d}", decimal) == 1.0 and check_numeric(decimal, f"{p}/{d}") == 1.0
    if 0 < abs(q) < 1 and "e" not in decimal:  # ".5", "-.25": a number may start at its decimal point
        assert check_numeric(f"{p}/{d}", decimal.replace("0.", ".", 1)) == 1.0


_PLAIN = st.text(
    st.characters(blacklist_characters="{}$\\.。", blacklist_categories=("Cs", "Cc", "Z")),
    min_size=1,
    max_size=20,
)
_WRAPS = [
    "\\boxed{%s}",
    "$%s$",
    "$$%s$$",
    "\\(%s\\)",
    "\\[ %s \\]",
    "%s.",
    "%s。",
    "$%s.$",
    "$\\boxed{%s}$.",
    " %s \n",
]


@given(_PLAIN, st.sampled_from(_WRAPS))
@settings(max_examples=200)
def test_property_unwrap_answer_takes_off_the_markup_and_nothing_else(x, wrap):
    assert unwrap_answer(wrap % x) == x and check_exact(x, wrap % x) == 1.0


@given(
    st.sampled_from(BUILTIN_TASKS),
    st.sampled_from(["en", "ja", "zh"]),
    st.integers(0, 10**6),
    st.integers(1, 4),
    st.sampled_from(["train", "test"]),
    st.data(),
)
@settings(max_examples=60)
def test_property_every_family_scores_its_own_answer_in_every_form_and_no_other(
    name, lang, seed, level, split, data
):
    """For any family, language, level and seed: the worked solution and its bare answer, boxed, in
    math mode, with a full stop, in full-width forms (and the forms its family reads: thousands
    separators, `x = 5`, a list's brackets, `×`) all score 1; a different answer scores 0."""
    task = get_task(name if level == 1 else f"{name}?difficulty={level}")
    p = task.problems(split, 1, seed=seed, language=lang)[0]
    assert p.meta["split"] == split and p.language == lang
    assert task.score(p, task.worked_solution(p)) == 1.0
    assert task.score(p, task.worked_solution(p)[len("<think>") :], require_think=True) == 1.0
    a = p.answer
    forms = [
        a,
        f"\\boxed{{{a}}}",
        f"${a}$",
        f"{a}.",
        f"{a}。",
        f"\\( {a} \\)",
        f"$\\boxed{{{a}}}$.",
        a.translate(_FULL_WIDTH),
    ]
    if name == "countdown":
        forms += [a.replace("*", "×").replace("/", "÷"), f"{a} = {p.meta['target']}", f"({a})"]
    elif name == "sorting":
        forms += [f"[{a}]", a.replace(", ", " "), a.replace(", ", "、"), a.replace(", ", "，")]
    else:
        n = int(a)
        forms += [f"{n:,}", str(n).replace("-", "−"), f"{n}.0", f"{2 * n}/2"]
        forms += [f"x = {a}", f"$x = {a}$"] if name == "linear_equation" else []
    for form in forms:
        assert task.score(p, f"t</think>{form}") == 1.0, (p.prompt, form)
    if name == "countdown":
        wrong = [f"{a}+1", f"({a})*2", f"{a}+{p.meta['numbers'][0]}"]
    elif name == "sorting":
        nums = [int(x) for x in a.split(", ")]
        wrong = [", ".join(map(str, nums[::-1])), ", ".join(map(str, nums[:-1])), f"{a}, {nums[-1] + 1}"]
    else:
        other = data.draw(st.integers(-(10**6), 10**6).filter(lambda x: x != int(a)))
        wrong = [str(other), f"\\boxed{{{other}}}", f"{a}.5", f"{a}1", f"{a} or {other}"]
    for form in wrong:
        assert task.score(p, f"t</think>{form}") == 0.0, (p.prompt, form)


_OPTIONS = {
    "arithmetic": {
        "digits": st.integers(1, 700),
        "ops": st.sampled_from(["add", "sub", "mul", "add,mul"]),
        "allow_negative": st.sampled_from(["true", "false"]),
    },
    "countdown": {
        "count": st.integers(2, 60),
        "max_number": st.integers(2, 10**4),
        "max_target": st.integers(1, 10**4),
    },
    "sorting": {"count": st.integers(2, 40), "max_value": st.integers(40, 10**25)},
    "comparison": {"digits": st.integers(1, 1200)},
    "largest": {"digits": st.integers(1, 1200)},
    "counting": {"length": st.integers(1, 40), "alphabet": st.sampled_from(["ab", "xyz", "abcdefgh"])},
    **{name: {} for name in ("linear_equation", "modular", "word_problem")},
}


@st.composite
def _family_specs(draw) -> str:
    name = draw(st.sampled_from(sorted(_OPTIONS)))
    options = {"difficulty": draw(st.integers(1, 5))} if draw(st.booleans()) else {}
    options |= {k: draw(v) for k, v in _OPTIONS[name].items() if draw(st.booleans())}
    return name + "".join(f"{'&' if i else '?'}{k}={v}" for i, (k, v) in enumerate(options.items()))


@given(_family_specs(), st.integers(0, 10**6))
@settings(max_examples=60)
def test_property_every_size_a_family_takes_is_held_out_honestly_and_scores_its_answers(spec, seed):
    """Options are refused by name, or give disjoint train and test problems (by id and by the
    canonical problem), the same for a seed every time, whose golds their verifier reads."""
    try:
        task = get_task(spec)
        train, test = (task.problems(split, 4, seed=seed) for split in ("train", "test"))
    except ValueError as e:
        assert spec.partition("?")[0] in str(e) or "must be" in str(e) or "needs" in str(e), str(e)
        return
    assert not {p.id for p in train} & {p.id for p in test}
    assert not {task.split_key(p.meta) for p in train} & {task.split_key(p.meta) for p in test}
    assert [(p.id, p.prompt) for p in test] == [(p.id, p.prompt) for p in task.problems("test", 4, seed=seed)]
    for p in train + test:
        assert task.verify(p, f"t</think>{p.answer}") == 1.0, (spec, p.answer)


_SMALL_SPACES = [
    "arithmetic?digits=1&ops=add",
    "arithmetic?digits=1&ops=mul",
    "sorting?count=3&max_value=6",
    "counting?length=2&alphabet=ab",
    "comparison?digits=1",
    "countdown?count=2&max_number=3&max_target=5",
]


@given(
    st.sampled_from(_SMALL_SPACES),
    st.integers(0, 40),
    st.sampled_from(["train", "test"]),
    st.integers(0, 1000),
    st.sampled_from([None, "en", "zh"]),
)
@settings(max_examples=30)
def test_property_problems_are_n_distinct_ones_or_an_error_naming_the_shortfall(spec, n, split, seed, lang):
    task = get_task(spec)
    try:
        problems = task.problems(split, n, seed=seed, language=lang)
    except ValueError as e:
        held = task.problems(split, n, seed=seed, language=lang, strict=False)
        assert f"has only {len(held)} distinct {split} problems" in str(e) and f"asked for {n}" in str(e)
        assert len(held) < n and len({p.id for p in held}) == len(held)
        return
    assert len(problems) == n == len({p.id for p in problems})
    assert all(p.meta["split"] == split and p.language == (lang or p.language) for p in problems)


_OPTION_KEY = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
_OPTION_VALUE = st.lists(st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True), min_size=1, max_size=3).map(
    ",".join
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([*BUILTIN_TASKS, "addition"]),
            st.dictionaries(_OPTION_KEY, _OPTION_VALUE, max_size=3),
        ),
        min_size=1,
        max_size=3,
    ),
    _OPTION_KEY,
    _OPTION_VALUE,
)
@settings(max_examples=40)
def test_property_task_specs_round_trip_through_their_options_and_lists(tasks, key, value):
    """A list of specs joined by commas splits back into them (their option values' commas kept), and
    setting or dropping an option changes that option only."""
    from nanoseek.data.tasks.base import spec_without, with_option

    specs = [
        base + "".join(f"{'&' if i else '?'}{k}={v}" for i, (k, v) in enumerate(o.items()))
        for base, o in tasks
    ]
    assert split_task_list(",".join(specs)) == specs
    base, options = parse_task_spec(specs[0], raw=True)
    assert parse_task_spec(with_option(specs[0], key, value), raw=True) == (base, {**options, key: value})
    assert parse_task_spec(spec_without(specs[0], key), raw=True) == (
        base,
        {k: v for k, v in options.items() if k != key},
    )
