"""Rewards on hand-made completions, including reward-hacking attempts."""

import json
import re
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data.rewards import (
    build_reward,
    format_reward,
    language_consistency,
    parse_reward_spec,
    score_pairs,
    script_counts,
    split_completion,
)
from nanoseek.data.tasks import Problem, check_math, check_numeric, extract_answer, get_task
from nanoseek.data.tasks.answers import extract_code

EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture
def add_en():
    return get_task("arithmetic").make({"op": "add", "a": 40, "b": 2}, "en")


@pytest.fixture
def add_ja():
    return get_task("arithmetic").make({"op": "add", "a": 40, "b": 2}, "ja")


def test_spec_parsing():
    assert parse_reward_spec("accuracy:1,format:0.2,language:0.1,code:1") == {
        "accuracy": 1.0,
        "format": 0.2,
        "language": 0.1,
        "code": 1.0,
    }
    assert parse_reward_spec("accuracy, format:0.5") == {"accuracy": 1.0, "format": 0.5}
    for bad, msg in [
        ("accuracy:1,speed:2", "unknown reward"),
        ("format:x", "bad weight"),
        ("format,format", "twice"),
        ("", "empty"),
        ("accuracy:nan", "bad weight"),  # every total NaN: GRPO's advantages and loss with them
        ("accuracy:1,format:inf", "bad weight"),
        ("accuracy:1,format:", "bad weight"),  # its number lost: not the weight 1 of a bare name
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_reward_spec(bad)


def test_weighted_total(add_en):
    reward = build_reward("accuracy:1,format:0.2,language:0.1")
    total, parts = reward(add_en, "ones: 0 + 2 = 2\ntens: 4 + 0 = 4\nSo it is 42.\n</think>\n42" + EOS)
    assert parts == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert total == pytest.approx(1.3)
    total, parts = reward(add_en, "So it is 41.\n</think>\n41")
    assert parts["accuracy"] == 0.0 and total == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("completion", "opened", "expected"),
    [
        ("steps\n</think>\n42", True, 1.0),
        ("<think>\nsteps\n</think>\n42", True, 1.0),  # the model repeated the opening tag once: fine
        ("<think>\nsteps\n</think>\n42", False, 1.0),
        ("steps\n</think>\n42", False, 0.0),  # prompt did not open the block: the tag is required
        (f"steps\n</think>\n42{EOS}", True, 1.0),
        ("42", True, 0.0),  # answer without thinking
        ("</think>\n42", True, 0.0),  # empty thinking
        ("<think></think>42", True, 0.0),
        ("   \n</think>\n42", True, 0.0),
        ("...\n</think>\n42", True, 0.0),
        ("steps\n</think>\n", True, 0.0),  # no answer
        (f"steps\n</think>\n  {EOS}", True, 0.0),  # a blank answer before the end of sentence
        ("steps\n</think>\n42</think>", True, 0.0),  # repeated closing tags
        ("steps</think></think></think>42", True, 0.0),
        ("steps\n<think>more</think>42", True, 0.0),  # a second opening tag mid-way
        ("<think><think>steps</think>42", True, 0.0),
        ("steps</think>42<｜User｜>and now?", True, 0.0),  # runs on into a new turn
        ("steps</think>42<｜begin▁of▁sentence｜>more", True, 0.0),  # runs on into a new document
        (f"steps</think>42{EOS}more{EOS}", True, 0.0),
        ("steps never closed", True, 0.0),
    ],
)
def test_format_reward(completion, opened, expected):
    assert format_reward(completion, prompt_opened_think=opened) == expected


def test_split_completion():
    assert split_completion("a</think>b") == ("a", "b")
    assert split_completion("<think>a</think>b") == ("a", "b")
    assert split_completion("never closed") == ("never closed", None)
    assert split_completion("plain answer", prompt_opened_think=False) == ("", "plain answer")
    # without the opening tag, what comes before </think> is still thinking: accuracy reads after it
    assert split_completion("a</think>b", prompt_opened_think=False) == ("a", "b")


def test_language_consistency():
    assert language_consistency("Add the ones, then the tens.", "en") == 1.0
    assert language_consistency("一の位を足す。次に十の位。", "ja") == 1.0
    assert language_consistency("先加个位，再加十位。", "zh") == 1.0
    assert language_consistency("Add the ones, then the tens.", "ja") == 0.0
    assert language_consistency("Add the ones, then the tens.", "zh") == 0.0
    # Japanese kana in a Chinese chain of thought count against it; kanji count for both
    assert 0.0 < language_consistency("一の位を足す", "zh") < 1.0
    mixed = language_consistency("First add 個位 digits", "en")
    assert 0.5 < mixed < 1.0
    # lone letters are symbols (x, a counting trace), not English words
    assert language_consistency("両辺を 3 で割る: x = 5", "ja") == 1.0
    assert script_counts("3x = 15 so x is 5")["latin"] == 4  # "so", "is"
    assert language_consistency("7 + 8 = 15", "en") == 0.0  # no words at all: no credit
    with pytest.raises(ValueError):
        language_consistency("hello", "fr")


def test_hack_answer_without_thinking(add_en):
    reward = build_reward("accuracy:1,format:0.2,language:0.1")
    total, parts = reward(add_en, "42")  # the prompt opened <think>: the model never left it
    assert parts["accuracy"] == 0.0 and parts["format"] == 0.0
    total_empty, parts = reward(add_en, "</think>\n42")
    assert parts["format"] == 0.0 and parts["language"] == 0.0
    full, _ = reward(add_en, "Add the ones and the tens.\n</think>\n42")
    assert full > total_empty > total
    # a prompt that did not open <think>: an answer written in the prompt's language is not a chain of
    # thought in it
    plain = build_reward("accuracy:1,language:0.1", prompt_opened_think=False)
    assert plain(add_en, "The answer is forty-two: 42")[1]["language"] == 0.0


def test_hack_thinking_in_wrong_language(add_ja):
    reward = build_reward("accuracy:1,format:0.2,language:0.1")
    english, parts_en = reward(add_ja, "Add the ones, then the tens.\n</think>\n42")
    japanese, parts_ja = reward(add_ja, "一の位を足して、十の位を足す。\n</think>\n42")
    assert parts_en["language"] == 0.0 and parts_ja["language"] == 1.0
    assert japanese > english


def test_hack_right_answer_after_a_conclusion_that_says_otherwise(add_en):
    """`conclusion`: accuracy reads the answer alone, so "So 85 is smaller." before 85 as the largest
    (what SR19's GRPO taught `largest`) is as right as reasoning that concludes 85 is the largest. The
    conclusion part tells them apart, and applies only where the task reads a conclusion."""
    task = get_task("largest")
    p = task.problems("test", 1, seed=0, language="en")[0]
    reward = build_reward("accuracy:1,format:0.2,conclusion:0.5")
    said_otherwise, parts = reward(p, f"Compare the tens.\nSo {p.answer} is smaller.\n</think>\n{p.answer}")
    assert parts["accuracy"] == 1.0 and parts["conclusion"] == 0.0
    concluded, parts = reward(p, f"Compare the tens.\nSo {p.answer} is the largest.\n</think>\n{p.answer}")
    assert parts["conclusion"] == 1.0 and concluded == pytest.approx(said_otherwise + 0.5)
    assert reward(p, task.worked_solution(p)[len("<think>") :])[1]["conclusion"] == 1.0
    # addition reads no conclusion: the part does not apply, the total is accuracy and format alone
    total, parts = reward(add_en, "Add the ones and the tens.\n</think>\n42")
    assert "conclusion" not in parts and total == pytest.approx(1.2)


def test_hack_other_scripts_count_against_the_language():
    # letters of a script the reward knows no language of are not in the prompt's language either
    assert language_consistency("Сначала сложим единицы, затем add", "en") < 0.5
    assert language_consistency("한국어로 생각하자 一の位を足す", "ja") < 0.6
    assert script_counts("Сначала сложим")["other"] == 13
    assert script_counts("café résumé")["latin"] == 10  # accented letters are Latin
    assert script_counts("नमस्ते")["other"] == 4  # vowel signs and viramas go on with their word
    assert language_consistency("The angle θ is 30 degrees", "en") == 1.0  # a lone letter is a symbol


def test_language_counts_each_letter_once_and_only_letters():
    """Every code point from U+20000 up counted as a kanji: an emoji flag's tag characters (England's
    flag holds six), a Japanese ideographic variation selector (葛 + U+E0100), private use. And text in
    NFD (macOS file names, some input methods) counted が as two kana, 한 as three letters."""
    import unicodedata

    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert language_consistency(f"England {england} won", "en") == 1.0
    assert script_counts("葛\U000e0100飾区") == script_counts("葛飾区")
    for text in ("がぎぐでGPUを使う", "한국어로 생각하자 一の位を足す"):
        assert script_counts(unicodedata.normalize("NFD", text)) == script_counts(text)


def test_kana_block_punctuation_is_not_a_letter():
    # the middle dot ・ sits in the katakana block, but Chinese writes it too, and a row of it is no
    # Japanese: it lifted an English chain of thought's ja share
    assert script_counts("列奥纳多・达・芬奇") == {"latin": 0, "kana": 0, "han": 7, "other": 0}
    assert language_consistency("列奥纳多・达・芬奇", "zh") == 1.0
    assert language_consistency("Add the ones ・・・・・・・・・・・・ ゠゛゜", "ja") == 0.0
    assert script_counts("データ・ベース")["kana"] == 6  # ー is a letter of the word


def test_latex_commands_are_symbols_not_english_words():
    # a Chinese or Japanese chain of thought that writes its math in LaTeX is not drifting into English
    assert language_consistency(r"先算 \frac{1}{2} \times 4 = 2，所以 \alpha 是 2", "zh") == 1.0
    assert language_consistency(r"両辺に \sqrt{2} を掛ける", "ja") == 1.0
    assert language_consistency(r"\text{then} \cdot", "en") == 1.0  # the words in \text{} still count


def test_language_leaves_the_tags_out():
    # a repeated </think> (format 0 already) or a stray tag is markup: its letters are not English words
    zh = get_task("arithmetic").make({"op": "add", "a": 40, "b": 2}, "zh")
    reward = build_reward("language:1")
    for completion in (
        "先加个位</think>再加十位</think>42",
        "先加个位<think>再加十位</think>42",
        "先加个位，再加十位<｜User｜>还有",  # truncated into a new turn, never closed
    ):
        assert reward(zh, completion).parts["language"] == 1.0, completion


def test_hack_wrong_language_after_an_early_think_end(add_ja):
    # a few Japanese words, </think>, English reasoning, </think>, the answer: accuracy reads the last
    # </think>, so the language reward must read everything before it
    reward = build_reward("accuracy:1,language:0.1")
    hack = "一の位を足す。\n</think>\nAdd the ones, then the tens, then write it down.\n</think>\n42"
    _, parts = reward(add_ja, hack)
    assert parts["accuracy"] == 1.0 and parts["language"] < 0.5
    assert split_completion("a</think>b</think>c") == ("a</think>b", "c")


def test_hack_stuffed_and_repeated(add_en):
    reward = build_reward("accuracy:1,format:0.2")
    stuffed = " ".join(str(i) for i in range(100))
    assert reward(add_en, f"Many guesses.\n</think>\n{stuffed}")[1]["accuracy"] == 0.0
    assert reward(add_en, "guess\n</think>\n41\n42\n43")[1]["accuracy"] == 0.0
    assert reward(add_en, "guess\n</think>\n\\boxed{41} \\boxed{42}")[1]["accuracy"] == 0.0
    total, parts = reward(add_en, "Adding.</think>42</think>42</think>42")
    assert parts["format"] == 0.0  # the last answer is right, the format is not
    # a correct answer inside the thinking does not count if the final answer is wrong
    assert reward(add_en, "It is 42.\n</think>\n41")[1]["accuracy"] == 0.0


# ------------------------------------------------------------------------ your own reward parts
CUSTOM = """
from dataclasses import dataclass

SEEN = []


@dataclass
class Seen:  # a dataclass needs its module in sys.modules while the file runs
    completion: str
    answer: object
    problem: object


def brevity(completion, answer, problem):
    SEEN.append(Seen(completion, answer, problem))
    return 1.0 / len(completion)


def only_ja(completion, answer, problem):
    return 1.0 if problem.language == "ja" else None


def text(completion, answer, problem):
    return "0.5"


def nan(completion, answer, problem):
    return float("nan")


def inf(completion, answer, problem):
    return float("-inf")


def many(completion, answer, problem):
    return [1.0]


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def custom_rewards(tmp_path, monkeypatch):
    """A reward module written into tmp_path, importable as `nanoseek_test_custom` from the working
    directory (the `nanoseek` script's sys.path does not hold it) and as the file ./custom.py."""
    (tmp_path / "nanoseek_test_custom.py").write_text(CUSTOM)
    (tmp_path / "custom.py").write_text(CUSTOM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "nanoseek_test_custom", raising=False)
    return tmp_path


def test_a_custom_part_by_a_windows_path_keeps_its_drive(custom_rewards, add_en):
    """`--reward D:/rewards/custom.py:brevity:0.5` (a path with a drive, as Windows writes it) was read as
    a reward named "D", weighted "/rewards/custom.py:brevity:0.5". A folder named `D:` stands in for the
    drive here."""
    (custom_rewards / "D:").mkdir()
    (custom_rewards / "D:" / "custom.py").write_text(CUSTOM)
    assert parse_reward_spec("accuracy,D:/custom.py:brevity:0.5") == {
        "accuracy": 1.0,
        "D:/custom.py:brevity": 0.5,
    }


def test_a_custom_part_named_by_module_or_file(custom_rewards, add_en, add_ja):
    spec = "accuracy:1,nanoseek_test_custom:brevity:0.5,./custom.py:only_ja, custom.py:brevity : 2"
    assert parse_reward_spec(spec) == {
        "accuracy": 1.0,
        "nanoseek_test_custom:brevity": 0.5,
        "./custom.py:only_ja": 1.0,
        "custom.py:brevity": 2.0,
    }
    completion = "4 + 2 = 6?\n</think>\n 42 "
    total, parts = build_reward(spec)(add_en, completion)
    n = len(completion)
    # only_ja does not apply to an English problem: left out, as code on a non-code problem
    assert parts == {"accuracy": 1.0, "nanoseek_test_custom:brevity": 1 / n, "custom.py:brevity": 1 / n}
    assert total == pytest.approx(1 + 0.5 / n + 2 / n)
    assert build_reward(spec)(add_ja, completion)[1]["./custom.py:only_ja"] == 1.0
    # the function gets the completion, the answer accuracy reads and the problem with its gold answer
    import nanoseek_test_custom

    seen = nanoseek_test_custom.SEEN[0]
    assert (seen.completion, seen.answer, seen.problem) == (completion, "42", add_en)
    assert seen.problem.answer == "42" and seen.problem.task == "arithmetic"
    # an unclosed think block has no answer
    build_reward("nanoseek_test_custom:brevity")(add_en, "still thinking")
    assert nanoseek_test_custom.SEEN[-1].answer is None
    # the file runs once, however it is named
    from nanoseek.data.rewards import load_reward_function

    assert load_reward_function("./custom.py:brevity") is load_reward_function("custom.py:brevity")
    # a weight is a number and a function a name: neither is taken for the other
    with pytest.raises(ValueError, match="unknown reward 'speed'"):
        parse_reward_spec("accuracy:1,speed:2")
    with pytest.raises(ValueError, match="bad weight 'x' for reward 'custom.py:brevity'"):
        parse_reward_spec("custom.py:brevity:x")


@pytest.mark.parametrize(
    "part, msg",
    [
        ("no_such_module_here:brevity", "cannot import 'no_such_module_here'"),
        ("./missing.py:brevity", "cannot import './missing.py': no file"),
        ("custom.py:brevty", "'custom.py' has no 'brevty'"),
        ("nanoseek_test_custom:NOT_A_FUNCTION:2", "is not a function"),
    ],
)
def test_a_custom_part_that_cannot_load_is_refused_by_the_spec(custom_rewards, part, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_reward_spec(f"accuracy:1,{part}")
    assert f"reward spec 'accuracy:1,{part}'" in str(e.value)


def test_a_custom_part_in_a_file_not_named_py_is_refused_by_the_spec(custom_rewards):
    """`./custom:brevity` (the file has no .py) was an AttributeError on None, not the spec's error."""
    (custom_rewards / "custom").write_text(CUSTOM)
    with pytest.raises(ValueError, match="cannot import './custom': .* is not a Python file"):
        parse_reward_spec("accuracy:1,./custom:brevity")


@pytest.mark.parametrize("name", ["text", "nan", "inf", "many"])
def test_a_custom_part_that_returns_no_finite_number_is_an_error(custom_rewards, add_en, name):
    """Never a NaN total (its group's signal gone) nor a string taken for a number: the part is named."""
    reward = build_reward(f"accuracy:1,custom.py:{name}:0.1")
    with pytest.raises(ValueError, match=f"reward 'custom.py:{name}' returned .* finite number"):
        reward(add_en, "t</think>42")


def test_unparseable_gold_is_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "unknown", "verifier": "numeric"}) + "\n")
    task = get_task(f"jsonl:{path}")
    reward = build_reward("accuracy:1,format:0.2", task=task)
    result = reward(task.items[0], "thinking</think>unknown")
    assert result.skipped and result.total == 0.0 and result.parts == {}
    total, parts = result  # still unpacks as a pair
    assert total == 0.0
    ok = build_reward("accuracy:1")(
        get_task("arithmetic").make({"op": "add", "a": 1, "b": 1}, "en"), "t</think>2"
    )
    assert not ok.skipped and ok.total == 1.0


def test_a_reward_scores_a_drawn_problem_by_its_task_whatever_its_file_holds_now(tmp_path):
    """GRPO's rewards look a problem's task up by name, per sample: a `jsonl:` file edited or moved
    mid-run (get_task reads a changed file again) must not fail the run nor change the scoring."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n")
    problem = get_task(f"jsonl:{path}").items[0]
    path.write_text("{not json\n")
    assert build_reward("accuracy:1")(problem, "t</think>2").total == 1.0
    path.unlink()
    assert build_reward("accuracy:1")(problem, "t</think>2").total == 1.0


def test_math_verify_works_off_the_main_thread():
    assert check_math("\\frac{3}{4}", "\\boxed{0.75}") == 1.0
    assert check_math("\\frac{3}{4}", "\\boxed{\\frac{6}{8}}") == 1.0
    assert check_math("\\frac{3}{4}", "\\boxed{\\frac{2}{3}}") == 0.0
    assert check_math("", "\\boxed{1}") is None  # unparseable gold
    results: dict[int, list] = {0: [], 1: []}
    errors = []

    def work(i):
        try:
            results[i].append(check_math("\\frac{3}{4}", "The answer is $\\boxed{\\frac{6}{8}}$"))
            results[i].append(check_math("x^2 + 2x", "$x(x+2)$"))
            results[i].append(check_math("\\sqrt{2}", "\\boxed{1.5}"))
        except Exception as e:  # the signal-based timeout raises ValueError off the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {0: [1.0, 1.0, 0.0], 1: [1.0, 1.0, 0.0]}


def test_math_verify_scores_answers_without_sigalrm(monkeypatch):
    """Where there is no SIGALRM (Windows), math-verify's timeouts run each parse in a spawned process,
    which cannot pickle the function it sends: every gold answer read as unparseable, every answer None."""
    import multiprocessing
    import os

    # Windows' start method, as `multiprocessing.set_start_method("spawn", force=True)` sets it
    monkeypatch.setattr(
        multiprocessing.context._default_context, "_actual_context", multiprocessing.get_context("spawn")
    )
    with monkeypatch.context() as m:  # (only around the calls: pytest's own paths read os.name too)
        m.setattr(os, "name", "nt")
        scores = [
            check_math("\\frac{3}{4}", "\\boxed{0.75}"),
            check_math("\\frac{3}{4}", "\\boxed{\\frac{2}{3}}"),
        ]
    assert scores == [1.0, 0.0]


@pytest.fixture
def code_task(tmp_path):
    rows = [
        {
            "prompt": "Read n, print 2n.",
            "tests": [{"input": "3", "output": "6"}, {"input": "10", "output": "20"}],
        },
        {"prompt": "Define sq(x).", "tests": "assert sq(3) == 9\nassert sq(-2) == 4"},
    ]
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task(f"jsonl:{path}")
    return task, {p.prompt: p for p in task.items}


def _code(src: str) -> str:
    return f"I will write it.\n</think>\n```python\n{src}\n```"


def test_code_reward_correct_partial_wrong(code_task):
    task, by = code_task
    reward = build_reward("accuracy:1,format:0.1,code:1", task=task)
    io = by["Read n, print 2n."]
    assert reward(io, _code("print(int(input()) * 2)")).parts == {"accuracy": 1.0, "format": 1.0, "code": 1.0}
    partial = reward(io, _code("n = int(input())\nprint(6 if n == 3 else 0)"))
    assert partial.parts["accuracy"] == 0.0 and partial.parts["code"] == 0.5
    fn = by["Define sq(x)."]
    assert reward(fn, _code("def sq(x):\n    return x * x")).parts["accuracy"] == 1.0
    assert reward(fn, _code("def sq(x):\n    return x + x")).parts["accuracy"] == 0.0
    # the code reward is not applicable to a non-code problem: no part, no crash
    add = get_task("arithmetic").make({"op": "add", "a": 1, "b": 1}, "en")
    assert "code" not in build_reward("accuracy:1,code:1")(add, "t</think>2").parts


@pytest.mark.parametrize(
    "src",
    [
        "while True:\n    pass",  # loops
        "import os\nwhile True:\n    os.fork()",  # forks
        "import subprocess\nsubprocess.run(['sh', '-c', 'echo 6'])",  # spawns
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=0.5)\nprint(6)",  # network
        "x = [bytearray(64 << 20) for _ in range(64)]\nprint(6)",  # fills memory
    ],
)
def test_code_reward_adversarial(code_task, src):
    task, by = code_task
    reward = build_reward("accuracy:1,code:1", task=task)
    t0 = time.perf_counter()
    result = reward(by["Read n, print 2n."], _code(src))
    assert result.parts == {"accuracy": 0.0, "code": 0.0}
    assert time.perf_counter() - t0 < 10


def test_batch_matches_sequential(add_en, add_ja):
    reward = build_reward("accuracy:1,format:0.2,language:0.1")
    problems = [add_en, add_ja, add_en]
    completions = ["Add.\n</think>\n42", "足す。\n</think>\n42", "no"]
    assert reward.batch(problems, completions, workers=2) == [
        reward(p, c) for p, c in zip(problems, completions, strict=True)
    ]
    with pytest.raises(ValueError):
        reward.batch(problems, completions[:2])


def test_batch_runs_a_repeated_completion_once(code_task, monkeypatch):
    # a group's identical completions each ran their program at once in the workers (the code-run cache
    # only fills when a run ends); scored once, as one after another, they cannot get two rewards
    import nanoseek.data.tasks.answers as answers

    task, by = code_task
    runs = []

    def fake_run(code, tests):
        runs.append(code)
        time.sleep(0.2)  # the others start while this one runs
        return (2, 2) if "* 2" in code else (0, 2)

    answers._cached_code_run.cache_clear()
    monkeypatch.setattr(answers, "run_code_tests", fake_run)
    io = by["Read n, print 2n."]
    right, wrong = _code("print(int(input()) * 2)"), _code("print(0)")
    reward = build_reward("accuracy:1,code:1", task=task)
    results = reward.batch([io] * 5, [right, right, wrong, right, wrong], workers=4)
    answers._cached_code_run.cache_clear()
    assert [r.total for r in results] == [2.0, 2.0, 0.0, 2.0, 0.0]
    assert sorted(runs) == sorted([extract_code(right), extract_code(wrong)])


def test_batch_scores_math_verify_on_the_calling_thread(tmp_path, monkeypatch):
    # math-verify's timeouts (SIGALRM) only work on the main thread: from a worker thread an answer
    # such as 10000000! ran for minutes. Other problems still overlap in the workers.
    import nanoseek.data.tasks.adapters as adapters

    path = tmp_path / "t.jsonl"
    rows = [{"prompt": "p", "answer": "\\frac{3}{4}", "verifier": "math"}, {"prompt": "q", "answer": "7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}")
    seen = []
    real = adapters.check_math
    monkeypatch.setattr(
        adapters, "check_math", lambda g, a: seen.append(threading.current_thread()) or real(g, a)
    )
    reward = build_reward("accuracy:1", task=task)
    problems = [task.items[0], task.items[1], task.items[0]]
    completions = ["t</think>\\boxed{0.75}", "t</think>7", "t</think>\\boxed{0.5}"]
    assert [r.total for r in reward.batch(problems, completions, workers=2)] == [1.0, 1.0, 0.0]
    assert seen == [threading.main_thread()] * 2


def test_ctrl_c_while_pairs_are_scored_on_workers_stops_at_once():
    """Ctrl-C while worker threads score (a sandbox run each) stops the scoring at once, even where the
    kernel delivers its SIGINT to a worker: the pairs not started are dropped, not scored first."""
    import signal

    submitted, release, finished = threading.Event(), threading.Event(), []

    def score(problem, completion):
        if problem.meta:  # math-verify's, on this thread once the others are submitted
            submitted.set()
            return completion
        if completion == "1":
            submitted.wait(20)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # the user's Ctrl-C, on this thread
        release.wait(20)  # a long sandbox run (released at the end: the wait costs nothing)
        finished.append(completion)
        return completion

    math = Problem(id="m", prompt="p", answer="a", language="en", task="t", meta={"verifier": "math"})
    code = Problem(id="c", prompt="p", answer="a", language="en", task="t")
    try:
        with pytest.raises(KeyboardInterrupt):
            score_pairs(score, [math, code, code, code], ["0", "1", "2", "3"], workers=2)
        assert not finished
    finally:
        release.set()


def test_a_typeset_minus_is_a_minus():
    assert check_numeric("-5", "−5") == 1.0


def test_the_iteration_mark_is_han():
    """々 (U+3005) repeats the ideograph before it (人々, 時々): a Han character of the word, in Chinese
    and Japanese text alike, not a letter of another script."""
    assert script_counts("人々") == {"latin": 0, "kana": 0, "han": 2, "other": 0}
    assert script_counts("時々です") == {"latin": 0, "kana": 2, "han": 2, "other": 0}


@pytest.mark.parametrize("reference", [".myrewards:brevity", "..pkg.mod:fn", ":brevity"])
def test_a_custom_part_with_no_absolute_module_path_is_refused_by_name(reference):
    """`.myrewards:brevity` (a relative import) raised import_module's TypeError out of the spec, and
    `:brevity` a bare "Empty module name": both are a reward that cannot be imported, named."""
    with pytest.raises(ValueError, match=f"reward {re.escape(repr(reference))}: cannot import"):
        parse_reward_spec(f"accuracy:1,{reference}:0.1")


# --- properties (hypothesis; the "ci" profile in conftest.py draws the same cases on every run) ---------

USER, ASSISTANT, BOS = "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>"
# completions built of the tags and of the text around them, partial tags included
_PIECES = [
    "<think>",
    "</think>",
    EOS,
    USER,
    ASSISTANT,
    BOS,
    "<think",
    "</think",
    "think>",
    "a",
    "42",
    " ",
    "\n",
]
_COMPLETION = st.one_of(
    st.lists(st.sampled_from([*_PIECES, "...", "思考", "考える", "x", "Zählen"]), max_size=12).map("".join),
    st.text(max_size=30),
)


def _format_by_the_rules(completion: str, opened: bool) -> float:
    """R1's template as the module docstring states it, written out again: one optional <think> at the
    start (required unless the prompt opened it), exactly one </think>, thinking with a letter or digit,
    a non-blank answer, and no other tag but one end of sentence at the very end."""
    text = completion.rstrip()
    text = text[: -len(EOS)] if text.endswith(EOS) else text
    if any(tag in text for tag in (EOS, USER, ASSISTANT, BOS)):
        return 0.0
    text = text.lstrip()
    if not text.startswith("<think>") and not opened:
        return 0.0
    text = text.removeprefix("<think>")
    if "<think>" in text or text.count("</think>") != 1:
        return 0.0
    thinking, answer = text.split("</think>")
    return float(any(c.isalnum() for c in thinking) and answer.strip() != "")


@given(_COMPLETION, st.booleans())
@settings(max_examples=300)
def test_property_format_reward_is_the_think_tag_rules(completion, opened):
    assert format_reward(completion, prompt_opened_think=opened) == _format_by_the_rules(completion, opened)
    thinking, answer = split_completion(completion, prompt_opened_think=opened)
    if format_reward(completion, prompt_opened_think=opened):  # what the format passes, accuracy reads
        assert answer.strip() == extract_answer(completion, require_think=True) != ""


@given(
    st.sampled_from(["en", "ja", "zh"]),
    st.integers(0, 99),
    st.integers(0, 99),
    _COMPLETION,
    st.booleans(),
    st.lists(st.floats(0.01, 10), min_size=3, max_size=3),
)
@settings(max_examples=150)
def test_property_every_part_is_in_0_to_1_and_the_right_answer_earns_more(lang, a, b, thinking, opened, w):
    """For any completion, each part lies in [0, 1] and the total is their weighted sum; the same
    completion ending in the right answer earns more than ending in a wrong one."""
    problem = get_task("arithmetic").make({"op": "add", "a": a, "b": b}, lang)
    weights = {"accuracy": w[0], "format": w[1], "language": w[2]}
    reward = build_reward(",".join(f"{k}:{v!r}" for k, v in weights.items()), prompt_opened_think=opened)
    total, parts = reward(problem, thinking)
    assert all(0.0 <= v <= 1.0 for v in parts.values()) and set(parts) == set(weights)
    assert total == pytest.approx(sum(weights[k] * v for k, v in parts.items()))
    right, wrong = (reward(problem, f"{thinking}</think>{n}") for n in (a + b, a + b + 1))
    assert right.parts["accuracy"] == 1.0 and wrong.parts["accuracy"] == 0.0 and right.total > wrong.total


@given(st.text(max_size=40), st.text(max_size=40), st.sampled_from(["en", "ja", "zh"]))
@settings(max_examples=300)
def test_property_script_counts_add_up_over_pieces_split_at_a_space(a, b, lang):
    """Letters are counted the same whether a chain of thought is read whole or in two pieces split at a
    space, and its language share lies in [0, 1]."""
    whole, left, right = script_counts(f"{a} {b}"), script_counts(a), script_counts(b)
    assert whole == {k: left[k] + right[k] for k in whole}
    assert 0.0 <= language_consistency(f"{a} {b}", lang) <= 1.0


@given(
    st.permutations(["accuracy", "format", "language", "code"]).flatmap(
        lambda names: st.lists(
            st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=4
        ).map(lambda ws: dict(zip(names, ws, strict=False)))
    )
)
@settings(max_examples=100)
def test_property_a_reward_spec_reads_back_its_weights(weights):
    spec = ",".join(f"{k}:{v!r}" for k, v in weights.items())
    assert parse_reward_spec(spec) == weights
    assert parse_reward_spec(repr(build_reward(spec))[len("RewardFn(") : -1]) == pytest.approx(
        weights, rel=1e-5
    )
